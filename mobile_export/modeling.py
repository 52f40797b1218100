"""Export-ready decoder: a transformers causal LM with a static KV cache.

The wrapper keeps the model's own decoder layers (norms, MLP, residual wiring come from
transformers, so they match the original exactly) and swaps each layer's attention for
:class:`CachedAttention`, which owns a static KV cache and calls ExecuTorch's LLM custom
ops (``llama.update_cache`` and ``llama.custom_sdpa``) that XNNPACK builds run fast.

One method serves prefill and decode: ``forward(tokens[1, T], input_pos[1]) -> logits``,
with a dynamic ``T``, the calling convention of ExecuTorch's LLM runner.

With ``attention="portable"`` the cache is written with plain slice assignment and read with
``scaled_dot_product_attention`` over the first ``end`` positions, all positions derived from
tensor shapes: the form Core ML converts into stateful ``slice_update`` programs (see
:class:`PortableAttention` and :class:`CoreMLEntry`).

With ``attention="onnx"`` the cache is passed in and out (past → present, ONNX Runtime GenAI's
convention) and attention is ONNX Runtime's ``GroupQueryAttention`` with rotary embedding
inside (see :mod:`mobile_export.ort_attention`, :class:`OnnxAttention` and :class:`OnnxEntry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mobile_export.errors import UserError
from mobile_export.rope_tables import rope_frequencies, rope_tables, rotary_dim_of

ATTENTION_KINDS: tuple[str, ...] = ("executorch", "portable", "onnx")

# Decoder families whose transformers modules this wrapper is tested against. Adding one
# means adding it to the parity tests first.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
)


def load_custom_ops() -> None:
    """Register ExecuTorch's LLM custom ops (custom SDPA, KV-cache update) with torch."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def check_supported(config) -> None:
    """Refuse architectures this wrapper has not been verified on, naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"unsupported architecture '{model_type}'",
            hint="supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES),
        )


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


def rotate_half_matrix(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Constant [D, D] weight W with ``F.linear(x, W) == rotate_half(x)`` on the first ``rotary_dim`` dims.

    A linear layer instead of slicing keeps rope inside one XNNPACK partition (XNNPACK cannot
    slice, or reshape with symbols, tensors of dynamic length); with one +-1 per row it is exact.
    """
    half = rotary_dim // 2
    rot = torch.zeros(head_dim, head_dim)
    idx = torch.arange(half)
    rot[idx + half, idx] = -1.0
    rot[idx, idx + half] = 1.0
    return rot.t().contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' half-split convention.

    ``x`` is [B, T, H, D]; ``cos``/``sin`` are [T, 1, D], padded with 1/0 beyond the rotary dims
    so partial-rotary models need no slicing.
    """
    return x * cos + nn.functional.linear(x, rot) * sin


class ExportRMSNorm(nn.Module):
    """RMSNorm written so XNNPACK takes it whole: the mean runs over a 4-D view's inner dims.

    Works on [..., D] inputs of any rank (hidden states [1, T, D], per-head q/k [1, T, H, D]).
    ``weight`` already holds the effective scale (Gemma's ``1 + w`` is folded in).
    """

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        dim = shape[-1]
        flat = x.float().view(1, -1, 1, dim)
        var = flat.pow(2).mean(dim=(2, 3), keepdim=True)
        out = ((flat * torch.rsqrt(var + self.eps)) * self.weight).to(x.dtype)
        if len(shape) == 4:
            return out.view(1, -1, shape[2], dim)
        if len(shape) == 3:
            return out.view(1, -1, dim)
        return out.view(-1, dim)


def _as_export_norm(module: nn.Module) -> ExportRMSNorm | None:
    """An equivalent :class:`ExportRMSNorm` for a transformers RMSNorm, found by probing.

    Models differ in how the weight enters (``w * x`` or ``(1 + w) * x``) and in the name of
    eps; instead of a table per model the candidate forms are checked against the module's
    own output. Returns None when no form matches (the module is then kept as it is).
    """
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if weight is None or eps is None or weight.dim() != 1 or weight.is_meta:
        return None
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, weight.shape[0], generator=gen)
    with torch.no_grad():
        expected = module.float()(probe)
        for effective in (weight.float(), 1.0 + weight.float()):
            candidate = ExportRMSNorm(effective, float(eps))
            if torch.allclose(candidate(probe).view_as(expected), expected, atol=1e-5, rtol=1e-5):
                return candidate
    return None


def _replace_norms(root: nn.Module) -> int:
    """Swap every RMSNorm under ``root`` for :class:`ExportRMSNorm`; returns how many."""
    replaced = 0
    for name, child in list(root.named_children()):
        if type(child).__name__.endswith("RMSNorm"):
            new = _as_export_norm(child)
            if new is not None:
                setattr(root, name, new)
                replaced += 1
                continue
        replaced += _replace_norms(child)
    return replaced


def _split_linear(linear: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    """Split a fused projection into separate linears by output rows (exact)."""
    parts = []
    offset = 0
    for size in sizes:
        part = nn.Linear(linear.in_features, size, bias=linear.bias is not None, device="meta")
        part.weight = nn.Parameter(linear.weight.detach()[offset : offset + size], requires_grad=False)
        if linear.bias is not None:
            part.bias = nn.Parameter(linear.bias.detach()[offset : offset + size], requires_grad=False)
        parts.append(part)
        offset += size
    return parts


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One linear computing several side by side (outputs concatenated; exact)."""
    has_bias = any(lin.bias is not None for lin in linears)
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        biases = [
            lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features, dtype=weight.dtype)
            for lin in linears
        ]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with separate gate/up projections (splits fused gate_up)."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate, up, down, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _split_fused_mlp(mlp: nn.Module) -> nn.Module:
    fused = getattr(mlp, "gate_up_proj", None)
    if not isinstance(fused, nn.Linear):
        return mlp
    act = getattr(mlp, "activation_fn", None) or mlp.act_fn
    half = fused.out_features // 2
    gate, up = _split_linear(fused, [half, half])
    return GatedMLP(gate, up, mlp.down_proj, act)


class CachedAttention(nn.Module):
    """Attention over a static KV cache laid out [1, max_seq_len, n_kv_heads, head_dim]."""

    def __init__(self, hf_attn: nn.Module, config, max_seq_len: int, ctx: StepContext):
        super().__init__()
        self.ctx = ctx
        self.head_dim = int(hf_attn.head_dim)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        if hasattr(hf_attn, "qkv_proj"):
            q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            self.q_proj, self.k_proj, self.v_proj = _split_linear(hf_attn.qkv_proj, [q_size, kv_size, kv_size])
        else:
            self.q_proj, self.k_proj, self.v_proj = hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj
        self.o_proj = hf_attn.o_proj
        self.q_norm = getattr(hf_attn, "q_norm", None)
        self.k_norm = getattr(hf_attn, "k_norm", None)
        self.scaling = float(hf_attn.scaling)
        self.max_seq_len = max_seq_len
        window = getattr(hf_attn, "sliding_window", None)
        # A window at least as long as the cache never masks anything: plain causal attention.
        self.sliding_window = int(window) if window and window < max_seq_len else None
        self.softcap = getattr(hf_attn, "attn_logit_softcapping", None)
        shape = (1, max_seq_len, self.n_kv_heads, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

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

    def _window_mask(self, start_pos, seq: int) -> torch.Tensor:
        """Additive [T, max_seq_len] mask: causal, and at most ``sliding_window`` keys back."""
        q_pos = torch.arange(seq, dtype=torch.long) + start_pos
        k_pos = torch.arange(self.max_seq_len, dtype=torch.long)
        delta = q_pos[:, None] - k_pos[None, :]
        allowed = (delta >= 0) & (delta < self.sliding_window)
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=torch.float32))

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
        delta = q_pos[:, None] - k_pos[None, :]
        allowed = delta >= 0
        if self.sliding_window is not None:
            allowed = allowed & (delta < self.sliding_window)
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
        elif self.sliding_window is not None:
            mask = self._window_mask(start_pos, seq)
            out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start_pos, mask, 0.0, False, self.scaling)
        else:
            out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start_pos, None, 0.0, True, self.scaling)
        out = out.reshape(1, -1, self.n_heads * self.head_dim)
        return self.o_proj(out), None


def additive_causal_mask(start_pos, seq: int, end_pos, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[1, 1, T, end] additive mask: query ``start_pos + i`` may see keys ``0 .. start_pos + i``."""
    q_pos = torch.arange(seq, dtype=torch.long) + start_pos
    k_pos = torch.arange(end_pos, dtype=torch.long)
    allowed = q_pos[:, None] >= k_pos[None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
    return mask[None, None]


def apply_rope_sliced(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotary embedding with rotate-half written as slices (converters that slice freely, e.g. Core ML).

    Same layout as :func:`apply_rope`; dims past ``rotary_dim`` have sin 0, so whatever the
    rotated term holds there is multiplied away.
    """
    half = rotary_dim // 2
    rotated = torch.cat([-x[..., half:rotary_dim], x[..., :half], x[..., rotary_dim:]], dim=-1)
    return x * cos + rotated * sin


class PortableAttention(CachedAttention):
    """Attention over a static cache laid out [1, n_kv_heads, max_seq_len, head_dim], in plain ops.

    Keys/values are written with slice assignment at ``start:end`` and attention reads the
    first ``end`` cache rows, with an additive mask (given, or causal). Start and end may be
    traced sizes, so converters see shape arithmetic rather than data-dependent indexing.
    The cache has the model's dtype (fp16 for Core ML, whose states are fp16).
    """

    def __init__(self, hf_attn: nn.Module, config, max_seq_len: int, ctx: StepContext, dtype: torch.dtype):
        super().__init__(hf_attn, config, max_seq_len, ctx)
        self.rotary_dim = self.head_dim  # set by the decoder from its rope tables
        shape = (1, self.n_kv_heads, max_seq_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def _expand_kv(self, cache: torch.Tensor, end) -> torch.Tensor:
        groups = self.n_heads // self.n_kv_heads
        kv = cache[:, :, :end]
        if groups == 1:
            return kv
        kv = kv[:, :, None].expand(1, self.n_kv_heads, groups, kv.shape[2], self.head_dim)
        return kv.reshape(1, self.n_heads, -1, self.head_dim)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, **_) -> tuple:
        seq = hidden_states.shape[1]
        q, k, v = self._project(hidden_states)
        cos, sin, _ = position_embeddings
        q, k = apply_rope_sliced(q, cos, sin, self.rotary_dim), apply_rope_sliced(k, cos, sin, self.rotary_dim)
        start, end = self.ctx.start_pos, self.ctx.end_pos
        self.k_cache[:, :, start:end] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[:, :, start:end] = v.transpose(1, 2).to(self.v_cache.dtype)
        q = q.transpose(1, 2)
        # The explicit casts keep converter dtypes aligned (Core ML reads fp16 states).
        keys = self._expand_kv(self.k_cache, end).to(q.dtype)
        values = self._expand_kv(self.v_cache, end).to(q.dtype)
        mask = self.ctx.mask if self.ctx.mask is not None else additive_causal_mask(start, seq, end, q.dtype)
        mask = mask.to(q.dtype)
        if self.sliding_window is not None:
            q_pos = torch.arange(seq, dtype=torch.long) + start
            k_pos = torch.arange(end, dtype=torch.long)
            too_far = (q_pos[:, None] - k_pos[None, :]) >= self.sliding_window
            mask = mask.masked_fill(too_far[None, None], float("-inf"))
        if self.softcap is not None:
            scores = torch.matmul(q, keys.transpose(2, 3)) * self.scaling
            scores = torch.tanh(scores / self.softcap) * self.softcap + mask
            out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), values)
        else:
            # SDPA's default scale is 1/sqrt(head_dim); other scalings (Gemma) go into q, since
            # Core ML's converter cannot take an explicit scale with fp16 inputs.
            correction = self.scaling * math.sqrt(self.head_dim)
            if abs(correction - 1.0) > 1e-6:
                q = q * correction
            out = nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.transpose(1, 2).reshape(1, seq, self.n_heads * self.head_dim)
        return self.o_proj(out), None


class OnnxAttention(CachedAttention):
    """Attention for ONNX Runtime: past/present KV tensors and one ``GroupQueryAttention`` call.

    The layer reads its past keys/values from the step context and leaves its presents there;
    rotary embedding runs inside the op from half-width cos/sin tables (the decoder passes them).
    """

    def __init__(self, hf_attn: nn.Module, config, max_seq_len: int, ctx: StepContext, index: int):
        super().__init__(hf_attn, config, max_seq_len, ctx)
        self.index = index
        self.k_cache = self.v_cache = None  # the cache lives outside the model
        self.qkv_proj = None
        self.rotary_in_op = True  # set by the decoder: whether GroupQueryAttention applies rotary itself
        self.rotary_dim = self.head_dim
        if self.q_norm is None and self.k_norm is None:  # one matmul for q, k and v (GQA's packed input)
            self.qkv_proj = _concat_linears([self.q_proj, self.k_proj, self.v_proj])
            self.q_proj = self.k_proj = self.v_proj = None

    def split_qkv(self) -> None:
        """Separate q, k and v matmuls again (exact), so each can be quantized on its own grid."""
        if self.qkv_proj is None:
            return
        kv = self.n_kv_heads * self.head_dim
        sizes = [self.n_heads * self.head_dim, kv, kv]
        self.q_proj, self.k_proj, self.v_proj = _split_linear(self.qkv_proj, sizes)
        self.qkv_proj = None

    def _rotate_outside(self, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding before the attention op (rotary widths ONNX Runtime's op cannot take)."""
        q = q.reshape(1, -1, self.n_heads, self.head_dim)
        k = k.reshape(1, -1, self.n_kv_heads, self.head_dim)
        q = apply_rope_sliced(q, cos, sin, self.rotary_dim).reshape(1, -1, self.n_heads * self.head_dim)
        k = apply_rope_sliced(k, cos, sin, self.rotary_dim).reshape(1, -1, self.n_kv_heads * self.head_dim)
        return q, k

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, **_) -> tuple:
        from mobile_export import ort_attention  # noqa: F401  (registers the op)

        if self.qkv_proj is not None and self.rotary_in_op:
            q, k, v = self.qkv_proj(hidden_states), None, None
        elif self.qkv_proj is not None:
            sizes = [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]
            q, k, v = self.qkv_proj(hidden_states).split(sizes, dim=-1)
        elif self.q_norm is None and self.k_norm is None:  # split for their own quantization
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        else:
            q, k, v = self._project(hidden_states)
            q = q.reshape(1, -1, self.n_heads * self.head_dim)
            k = k.reshape(1, -1, self.n_kv_heads * self.head_dim)
            v = v.reshape(1, -1, self.n_kv_heads * self.head_dim)
        cos, sin, _ = position_embeddings
        if not self.rotary_in_op:  # rotary embedding in plain ops; cos/sin are full-width [T, 1, D] rows
            q, k = self._rotate_outside(q, k, cos, sin)
            cos = sin = None
        past_key, past_value = self.ctx.past[self.index]
        out, present_key, present_value = torch.ops.mobile_export.group_query_attention(
            q,
            k,
            v,
            past_key,
            past_value,
            self.ctx.attention_mask,
            cos,
            sin,
            self.n_heads,
            self.n_kv_heads,
            self.scaling,
            float(self.softcap or 0.0),
            int(self.sliding_window or 0),
        )
        self.ctx.presents[self.index] = (present_key, present_value)
        return self.o_proj(out), None


class ExportableDecoder(nn.Module):
    """A transformers causal LM rewired for export: static KV cache, last-token logits.

    ``forward(tokens: int64[1, T], input_pos: int64[1]) -> float32[1, vocab]`` writes the T
    tokens' keys/values at ``input_pos[0]`` and returns the logits of the last token.
    """

    def __init__(self, hf_model: nn.Module, max_seq_len: int, attention: str = "executorch"):
        super().__init__()
        config = hf_model.config
        check_supported(config)
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, not {attention!r}")
        if attention == "executorch":
            load_custom_ops()
        self.attention = attention
        self.config = config
        self.max_seq_len = max_seq_len
        base = hf_model.model
        self.embed_tokens = base.embed_tokens
        # padding_idx only affects training gradients; without it the quantized-embedding
        # pattern ExecuTorch fuses into its embedding kernels matches.
        self.embed_tokens.padding_idx = None
        self.layers = base.layers
        self.norm = base.norm
        self.lm_head = hf_model.lm_head
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.ctx = StepContext()
        layer_types = getattr(config, "layer_types", None)
        head_dim = int(self.layers[0].self_attn.head_dim)
        tables = rope_tables(type(base.rotary_emb), config, max_seq_len, head_dim)
        rotary_dims = {rotary_dim_of(sin[1:]) for _, sin in tables.values()}
        rotary_dim = max(rotary_dims)
        self.register_buffer("rope_rot", rotate_half_matrix(head_dim, rotary_dim), persistent=False)
        self._rope_keys: list[str] = []
        self._rope_scaling: dict[str, float] = {}  # keys whose rows the graph computes (no table)
        frequencies = rope_frequencies(type(base.rotary_emb), config, tables) if attention == "executorch" else {}
        key_for_type: dict[str | None, str] = {}
        for index, (layer_type, (cos, sin)) in enumerate(tables.items()):
            key = f"rope{index}"
            if layer_type in frequencies:
                inv_freq, self._rope_scaling[key] = frequencies[layer_type]
                self.register_buffer(f"{key}_inv_freq", inv_freq, persistent=False)
            else:
                self.register_buffer(f"{key}_cos", cos, persistent=False)
                self.register_buffer(f"{key}_sin", sin, persistent=False)
            if attention == "onnx":  # GroupQueryAttention's caches: [max_seq_len, rotary_dim/2]
                half = rotary_dim // 2
                self.register_buffer(f"{key}_cos_half", cos[:, 0, :half].contiguous(), persistent=False)
                self.register_buffer(f"{key}_sin_half", sin[:, 0, :half].contiguous(), persistent=False)
            key_for_type[layer_type] = key
        for i, layer in enumerate(self.layers):
            layer_type = layer_types[i] if (layer_types and None not in key_for_type) else None
            self._rope_keys.append(key_for_type[layer_type])
            if attention == "portable":
                dtype = next(layer.parameters()).dtype
                layer.self_attn = PortableAttention(layer.self_attn, config, max_seq_len, self.ctx, dtype)
                layer.self_attn.rotary_dim = rotary_dim
            elif attention == "onnx":
                from mobile_export.ort_attention import rotary_fits

                layer.self_attn = OnnxAttention(layer.self_attn, config, max_seq_len, self.ctx, i)
                layer.self_attn.rotary_dim = rotary_dim
                layer.self_attn.rotary_in_op = rotary_fits(rotary_dim, head_dim)
            else:
                layer.self_attn = CachedAttention(layer.self_attn, config, max_seq_len, self.ctx)
            layer.mlp = _split_fused_mlp(layer.mlp)

    def prepare_for_export(self) -> None:
        """Swap RMSNorms for XNNPACK-friendly equivalents (after weights are in place).

        ONNX keeps transformers' own RMSNorms: that is the pattern ONNX Runtime's
        ``SimplifiedLayerNormalization`` fusions recognise.
        """
        if self.attention != "onnx":
            _replace_norms(self)

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Eager call in the runner's convention: feed ``tokens`` at ``start_pos``, get logits [vocab] (fp32)."""
        from mobile_export.runtimes.executorch import native_output_silenced

        # ExecuTorch's eager custom ops log CPU probing and "No temp allocator provided" natively.
        with torch.no_grad(), native_output_silenced():
            ids = torch.tensor([tokens], dtype=torch.long)
            return self.run(ids, start_pos, start_pos + len(tokens))[0].float()

    def reset_cache(self) -> None:
        """Zero every layer's KV cache (eager use between independent sequences)."""
        if self.attention == "onnx":
            return  # no cache inside the model
        for layer in self.layers:
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()

    def run_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Eager call of decoder layer ``index`` alone on hidden states [1, T, D] at positions
        0..T-1 (layer-by-layer calibration); writes that layer's KV cache."""
        seq = hidden.shape[1]
        self.ctx.start_pos, self.ctx.end_pos, self.ctx.mask = 0, seq, None
        cos, sin = self._rope_rows(self._rope_keys[index], 0, seq)
        with torch.no_grad():
            out = self.layers[index](
                hidden, position_embeddings=(cos, sin, self.rope_rot), attention_mask=None, position_ids=None
            )
        return out[0] if isinstance(out, tuple) else out

    def _rope_rows(self, key: str, start_pos, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows [seq, 1, head_dim] of positions ``start_pos ..``: computed from the
        frequencies when the table was dropped, else sliced from the table."""
        if key not in self._rope_scaling:
            cos, sin = getattr(self, f"{key}_cos"), getattr(self, f"{key}_sin")
            return cos.narrow(0, start_pos, seq), sin.narrow(0, start_pos, seq)
        positions = torch.arange(seq, dtype=torch.float32) + start_pos
        freqs = positions[:, None] * getattr(self, f"{key}_inv_freq")[None, :]
        freqs = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        scaling = self._rope_scaling[key]
        return freqs.cos() * scaling, freqs.sin() * scaling

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        start_pos = input_pos[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos < self.max_seq_len)
        torch._check(start_pos + seq <= self.max_seq_len)
        return self.run(tokens, start_pos, start_pos + seq)

    def run(
        self, tokens: torch.Tensor, start_pos, end_pos, mask: torch.Tensor | None = None, all_positions: bool = False
    ) -> torch.Tensor:
        """Feed ``tokens`` at positions ``start_pos .. end_pos - 1``; return the last token's logits
        ([1, vocab]), or every token's ([1, T, vocab]) with ``all_positions``.

        ``mask`` (portable attention only) is an additive [1, 1, T, end_pos] mask; None means causal.
        """
        seq = tokens.shape[1]
        self.ctx.start_pos = start_pos
        self.ctx.end_pos = end_pos
        self.ctx.mask = mask
        hidden = self.embed_tokens(tokens)
        rope = {}
        for key in sorted(set(self._rope_keys)):
            if self.attention == "onnx":
                if self.layers[0].self_attn.rotary_in_op:
                    rope[key] = (getattr(self, f"{key}_cos_half"), getattr(self, f"{key}_sin_half"), None)
                else:  # positions end at the attention mask's width (past + new tokens)
                    total = self.ctx.attention_mask.shape[1]
                    cos, sin = getattr(self, f"{key}_cos"), getattr(self, f"{key}_sin")
                    rope[key] = (cos[total - seq : total], sin[total - seq : total], None)
                continue
            if self.attention == "portable":  # Core ML converts slices with traced bounds, not narrow
                cos, sin = getattr(self, f"{key}_cos")[start_pos:end_pos], getattr(self, f"{key}_sin")[start_pos:end_pos]
            else:
                cos, sin = self._rope_rows(key, start_pos, seq)
            rope[key] = (cos, sin, self.rope_rot)
        for layer, key in zip(self.layers, self._rope_keys, strict=True):
            out = layer(hidden, position_embeddings=rope[key], attention_mask=None, position_ids=None)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = self.norm(hidden if all_positions else hidden[:, -1, :])
        logits = self.lm_head(hidden)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        self.ctx.mask = None
        return logits


class CoreMLEntry(nn.Module):
    """Core ML calling convention over a portable-attention decoder.

    ``forward(input_ids: int32[1, T], causal_mask: fp16[1, 1, T, end]) -> logits[1, vocab]``:
    the T tokens sit at positions ``end - T .. end - 1``, so the cache positions come from the
    two inputs' shapes (both flexible), and the caller's mask decides what each query sees.
    """

    def __init__(self, decoder: ExportableDecoder):
        super().__init__()
        if decoder.attention != "portable":
            raise ValueError("Core ML needs a decoder built with attention='portable'")
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        end = causal_mask.shape[-1]
        return self.decoder.run(input_ids, end - seq, end, causal_mask)


class OnnxEntry(nn.Module):
    """ONNX Runtime GenAI's calling convention over an onnx-attention decoder.

    ``forward(input_ids: int64[1, S], attention_mask: int64[1, T], past_key_0, past_value_0, ...)
    -> (logits[1, S, vocab], present_key_0, present_value_0, ...)`` with caches [1, Hkv, P, D]
    and T = P + S.
    """

    def __init__(self, decoder: ExportableDecoder):
        super().__init__()
        if decoder.attention != "onnx":
            raise ValueError("ONNX export needs a decoder built with attention='onnx'")
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple:
        ctx = self.decoder.ctx
        n_layers = len(self.decoder.layers)
        ctx.past = [(past[2 * i], past[2 * i + 1]) for i in range(n_layers)]
        ctx.presents = [None] * n_layers
        ctx.attention_mask = attention_mask
        logits = self.decoder.run(input_ids, 0, input_ids.shape[1], all_positions=True)
        presents = [t for pair in ctx.presents for t in pair]
        ctx.past = ctx.presents = ctx.attention_mask = None
        return (logits, *presents)


def example_inputs(max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs used to trace: a short prompt at position 0 (length > 1 keeps T dynamic)."""
    seq = min(max(2, math.ceil(max_seq_len / 8)), max_seq_len - 1, 16)
    return torch.zeros((1, seq), dtype=torch.long), torch.tensor([0], dtype=torch.long)


def dynamic_shapes(max_seq_len: int) -> tuple:
    """Dynamic token dimension for export: 1..max_seq_len tokens per call."""
    seq = torch.export.Dim("seq_len", min=1, max=max_seq_len)
    return ({1: seq}, None)
