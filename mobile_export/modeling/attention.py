"""What every attention layer of the export wrapper shares, and ExecuTorch's own layer.

- :class:`StepContext`: per-call state all layers of one decoder read (positions, masks, ONNX caches);
- :class:`Masking`: which keys a query sees, :class:`FullCausal` or :class:`SlidingWindow`,
  chosen once per layer from the family record (:mod:`mobile_export.families`) and the config;
- :class:`AttentionSpec`: a layer's sizes, masking and soft-capping, fixed at construction;
- :class:`DecoderAttention`: q/k/v/o projections taken from the transformers layer (fused
  ``qkv_proj`` split), per-head q/k norms;
- :class:`CachedAttention`: static KV cache and ExecuTorch's LLM custom ops
  (``llama.update_cache``, ``llama.custom_sdpa``). The other layouts are in
  :mod:`~mobile_export.modeling.attention_portable` and :mod:`~mobile_export.modeling.attention_onnx`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from mobile_export.families import ModelFamily
from mobile_export.modeling.projections import split_linear
from mobile_export.modeling.rope import apply_rope


@dataclass
class StepContext:
    """Per-call state shared by all attention layers: the start position of this step, and for
    portable attention the end position and the caller's additive mask (None: causal)."""

    start_pos: object = 0
    end_pos: object = 0
    mask: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # onnx: [1, total] ones
    past: list | None = None  # onnx: per layer (past_key, past_value)
    presents: list | None = None  # onnx: per layer (present_key, present_value), filled by the layers


def _float_mask(allowed: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=torch.float32))


class Masking(ABC):
    """Which cached keys each query may see; ``delta`` is query position minus key position."""

    window: int | None = None

    @abstractmethod
    def allowed(self, delta: torch.Tensor) -> torch.Tensor:
        """Boolean: may a query see a key ``delta`` positions back."""

    @abstractmethod
    def sdpa_mask(self, start_pos, seq: int, cache_len: int) -> tuple[torch.Tensor | None, bool]:
        """``(mask, is_causal)`` for ``llama.custom_sdpa`` over a cache of ``cache_len`` rows."""

    @abstractmethod
    def restrict(self, mask: torch.Tensor, start_pos, seq: int, end_pos) -> torch.Tensor:
        """A causal additive mask [1, 1, T, end] (the caller's, or built) narrowed to this rule."""


@dataclass(frozen=True)
class FullCausal(Masking):
    """Every earlier position and the query's own."""

    def allowed(self, delta: torch.Tensor) -> torch.Tensor:
        return delta >= 0

    def sdpa_mask(self, start_pos, seq: int, cache_len: int) -> tuple[torch.Tensor | None, bool]:
        return None, True

    def restrict(self, mask: torch.Tensor, start_pos, seq: int, end_pos) -> torch.Tensor:
        return mask


@dataclass(frozen=True)
class SlidingWindow(Masking):
    """The ``window`` most recent positions, the query's own included."""

    window: int

    def allowed(self, delta: torch.Tensor) -> torch.Tensor:
        return (delta >= 0) & (delta < self.window)

    def sdpa_mask(self, start_pos, seq: int, cache_len: int) -> tuple[torch.Tensor | None, bool]:
        """Additive [T, cache_len] mask: causal, and at most ``window`` keys back."""
        q_pos = torch.arange(seq, dtype=torch.long) + start_pos
        k_pos = torch.arange(cache_len, dtype=torch.long)
        return _float_mask(self.allowed(q_pos[:, None] - k_pos[None, :])), False

    def restrict(self, mask: torch.Tensor, start_pos, seq: int, end_pos) -> torch.Tensor:
        q_pos = torch.arange(seq, dtype=torch.long) + start_pos
        k_pos = torch.arange(end_pos, dtype=torch.long)
        too_far = (q_pos[:, None] - k_pos[None, :]) >= self.window
        return mask.masked_fill(too_far[None, None], float("-inf"))


def masking_for(window: int | None, max_seq_len: int) -> Masking:
    """A window at least as long as the cache never masks anything: plain causal attention."""
    return SlidingWindow(int(window)) if window and window < max_seq_len else FullCausal()


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention, decided once when the decoder is built."""

    family: ModelFamily
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rotary_dim: int
    masking: Masking
    softcap: float | None  # tanh soft-capping of the attention logits (Gemma 2)

    @classmethod
    def of_layer(cls, family: ModelFamily, config, hf_attn: nn.Module, index: int, max_seq_len: int, rotary_dim: int):
        n_heads = int(config.num_attention_heads)
        return cls(
            family=family,
            n_heads=n_heads,
            n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
            head_dim=int(hf_attn.head_dim),
            rotary_dim=rotary_dim,
            masking=masking_for(family.window_of_layer(config, index), max_seq_len),
            softcap=family.attention_softcap_of(config),
        )


class DecoderAttention(nn.Module):
    """The projections and sizes of one attention layer; subclasses own the cache and the attention."""

    def __init__(self, hf_attn: nn.Module, spec: AttentionSpec, max_seq_len: int, ctx: StepContext):
        super().__init__()
        self.ctx = ctx
        self.head_dim, self.n_heads, self.n_kv_heads = spec.head_dim, spec.n_heads, spec.n_kv_heads
        self.rotary_dim = spec.rotary_dim
        if spec.family.fused_qkv and not isinstance(hf_attn, DecoderAttention):  # (a rewrap reuses the split)
            q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            self.q_proj, self.k_proj, self.v_proj = split_linear(hf_attn.qkv_proj, [q_size, kv_size, kv_size])
        else:
            self.q_proj, self.k_proj, self.v_proj = hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj
        self.o_proj = hf_attn.o_proj
        self.q_norm = hf_attn.q_norm if spec.family.qk_norm else None
        self.k_norm = hf_attn.k_norm if spec.family.qk_norm else None
        self.scaling = float(hf_attn.scaling)
        self.max_seq_len = max_seq_len
        self.masking = spec.masking
        self.sliding_window = spec.masking.window
        self.softcap = spec.softcap

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Views use -1 for the dynamic length: XNNPACK reshapes take one inferred dim, no symbols.
        q = self.q_proj(x).view(1, -1, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(1, -1, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(1, -1, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return q, k, v


class CachedAttention(DecoderAttention):
    """Attention over a static KV cache laid out [1, max_seq_len, n_kv_heads, head_dim]."""

    def __init__(self, hf_attn: nn.Module, spec: AttentionSpec, max_seq_len: int, ctx: StepContext):
        super().__init__(hf_attn, spec, max_seq_len, ctx)
        shape = (1, max_seq_len, self.n_kv_heads, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def _softcapped_attention(self, q: torch.Tensor, start_pos, seq: int) -> torch.Tensor:
        """Plain attention math, for models that soft-cap attention logits (custom SDPA cannot)."""
        n_keys = start_pos + seq
        k = self.k_cache.narrow(1, 0, n_keys).transpose(1, 2)
        v = self.v_cache.narrow(1, 0, n_keys).transpose(1, 2)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q.transpose(1, 2), k.transpose(2, 3)) * self.scaling
        scores = torch.tanh(scores / self.softcap) * self.softcap
        q_pos = torch.arange(seq, dtype=torch.long) + start_pos
        k_pos = torch.arange(n_keys, dtype=torch.long)
        allowed = self.masking.allowed(q_pos[:, None] - k_pos[None, :])
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(probs, v).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, **_) -> tuple:
        seq = hidden_states.shape[1]
        q, k, v = self._project(hidden_states)
        cos, sin, rot = position_embeddings
        q, k = apply_rope(q, cos, sin, rot), apply_rope(k, cos, sin, rot)
        start_pos = self.ctx.start_pos
        torch.ops.llama.update_cache(k, self.k_cache, start_pos)
        torch.ops.llama.update_cache(v, self.v_cache, start_pos)
        if self.softcap is not None:
            out = self._softcapped_attention(q, start_pos, seq)
        else:
            mask, causal = self.masking.sdpa_mask(start_pos, seq, self.max_seq_len)
            out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start_pos, mask, 0.0, causal, self.scaling)
        out = out.reshape(1, -1, self.n_heads * self.head_dim)
        return self.o_proj(out), None


def additive_causal_mask(start_pos, seq: int, end_pos, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[1, 1, T, end] additive mask: query ``start_pos + i`` may see keys ``0 .. start_pos + i``."""
    q_pos = torch.arange(seq, dtype=torch.long) + start_pos
    k_pos = torch.arange(end_pos, dtype=torch.long)
    allowed = q_pos[:, None] >= k_pos[None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
    return mask[None, None]
