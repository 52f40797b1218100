"""Attention kinds: how a decoder's layers attend and where their KV caches live, one strategy each.

A backend names its kind (``Backend.attention``); :class:`~mobile_export.modeling.decoder.ExportableDecoder`
looks it up once with :func:`attention_kind` and asks it, instead of comparing names:

- ``executorch``: :class:`~mobile_export.modeling.attention.CachedAttention`, ExecuTorch's custom
  ops, static rope rows computed in the graph from their frequencies;
- ``portable``: :class:`~mobile_export.modeling.attention_portable.PortableAttention`, plain ops
  and slice-assigned caches (Core ML);
- ``onnx``: :class:`~mobile_export.modeling.attention_onnx.OnnxAttention`, past/present caches
  outside the model and ONNX Runtime's ``GroupQueryAttention``; transformers' own RMSNorms stay
  (ONNX Runtime's ``SimplifiedLayerNormalization`` fusions recognise them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from mobile_export.modeling.attention import AttentionSpec, CachedAttention, StepContext
from mobile_export.modeling.attention_onnx import OnnxAttention
from mobile_export.modeling.attention_portable import PortableAttention
from mobile_export.rope_tables import rope_frequencies


class AttentionKind(ABC):
    """One way of attending, chosen once per decoder. ``rotary_dim``/``head_dim`` are the decoder's."""

    name: ClassVar[str]
    replaces_norms: ClassVar[bool] = True  # swap RMSNorms for ExportRMSNorm before export
    has_inner_cache: ClassVar[bool] = True  # KV caches are buffers of the layers

    def __init__(self, rotary_dim: int, head_dim: int):
        self.rotary_dim, self.head_dim = rotary_dim, head_dim

    @classmethod  # noqa: B027 - a no-op is right for kinds that call no custom ops
    def load_ops(cls) -> None:
        """Register the torch ops this kind's layers call (before any layer is built)."""

    def rope_frequencies(self, rotary_cls: type, config, tables: dict) -> dict:
        """Per layer type, the frequencies that replace its stored table (none: keep the tables)."""
        return {}

    def extra_rope_buffers(self, cos: torch.Tensor, sin: torch.Tensor) -> dict[str, torch.Tensor]:
        """Further per-table buffers this kind reads, by name suffix."""
        return {}

    @abstractmethod
    def make_layer(self, hf_attn: nn.Module, spec: AttentionSpec, max_seq_len: int, ctx: StepContext, index: int,
                   dtype: torch.dtype) -> nn.Module:  # fmt: skip
        """The attention layer that replaces ``hf_attn`` in decoder layer ``index``."""

    @abstractmethod
    def rope_inputs(self, decoder, key: str, start_pos, end_pos, seq: int) -> tuple:
        """The ``position_embeddings`` the layers reading table ``key`` get for this step."""


class ExecuTorchAttentionKind(AttentionKind):
    name = "executorch"

    @classmethod
    def load_ops(cls) -> None:
        load_custom_ops()

    def rope_frequencies(self, rotary_cls: type, config, tables: dict) -> dict:
        return rope_frequencies(rotary_cls, config, tables)

    def make_layer(self, hf_attn, spec, max_seq_len, ctx, index, dtype) -> nn.Module:
        return CachedAttention(hf_attn, spec, max_seq_len, ctx)

    def rope_inputs(self, decoder, key: str, start_pos, end_pos, seq: int) -> tuple:
        cos, sin = decoder._rope_rows(key, start_pos, seq)
        return cos, sin, decoder.rope_rot


class PortableAttentionKind(AttentionKind):
    name = "portable"

    def make_layer(self, hf_attn, spec, max_seq_len, ctx, index, dtype) -> nn.Module:
        return PortableAttention(hf_attn, spec, max_seq_len, ctx, dtype)

    def rope_inputs(self, decoder, key: str, start_pos, end_pos, seq: int) -> tuple:
        # Core ML converts slices with traced bounds, not narrow
        cos, sin = getattr(decoder, f"{key}_cos")[start_pos:end_pos], getattr(decoder, f"{key}_sin")[start_pos:end_pos]
        return cos, sin, decoder.rope_rot


class OnnxAttentionKind(AttentionKind):
    name = "onnx"
    replaces_norms = False
    has_inner_cache = False

    def __init__(self, rotary_dim: int, head_dim: int):
        from mobile_export.ort_attention import rotary_fits

        super().__init__(rotary_dim, head_dim)
        self.rotary_in_op = rotary_fits(rotary_dim, head_dim)  # whether GroupQueryAttention rotates

    def extra_rope_buffers(self, cos: torch.Tensor, sin: torch.Tensor) -> dict[str, torch.Tensor]:
        half = self.rotary_dim // 2  # GroupQueryAttention's caches: [max_seq_len, rotary_dim/2]
        return {"cos_half": cos[:, 0, :half].contiguous(), "sin_half": sin[:, 0, :half].contiguous()}

    def make_layer(self, hf_attn, spec, max_seq_len, ctx, index, dtype) -> nn.Module:
        return OnnxAttention(hf_attn, spec, max_seq_len, ctx, index, self.rotary_in_op)

    def rope_inputs(self, decoder, key: str, start_pos, end_pos, seq: int) -> tuple:
        if self.rotary_in_op:
            return getattr(decoder, f"{key}_cos_half"), getattr(decoder, f"{key}_sin_half"), None
        # positions end at the attention mask's width (past + new tokens)
        total = decoder.ctx.attention_mask.shape[1]
        cos, sin = getattr(decoder, f"{key}_cos"), getattr(decoder, f"{key}_sin")
        return cos[total - seq : total], sin[total - seq : total], None


_KINDS: tuple[type[AttentionKind], ...] = (ExecuTorchAttentionKind, PortableAttentionKind, OnnxAttentionKind)
ATTENTION_KINDS: tuple[str, ...] = tuple(kind.name for kind in _KINDS)


def attention_kind(name: str) -> type[AttentionKind]:
    """The kind called ``name``; ValueError naming the kinds otherwise."""
    for kind in _KINDS:
        if kind.name == name:
            return kind
    raise ValueError(f"attention must be one of {ATTENTION_KINDS}, not {name!r}")


def load_custom_ops() -> None:
    """Register ExecuTorch's LLM custom ops (custom SDPA, KV-cache update) with torch."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
