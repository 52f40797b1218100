"""The export-ready decoder: a transformers causal LM with a static KV cache.

- :mod:`.decoder`: :class:`ExportableDecoder`, prefill and decode in one ``forward``;
- :mod:`.attention_kinds`: how layers attend, one strategy per kind (``executorch``: ExecuTorch's
  LLM custom ops; ``portable``: plain ops for Core ML; ``onnx``: ONNX Runtime's
  ``GroupQueryAttention`` with past/present caches), the layers in :mod:`.attention`,
  :mod:`.attention_portable` and :mod:`.attention_onnx`;
- :mod:`.entries`: the Core ML and ONNX Runtime GenAI calling conventions, export inputs;
- :mod:`.norms`, :mod:`.projections`, :mod:`.rope`: the export forms of norms, fused
  projections and rotary embedding.

What differs between model families comes from :mod:`mobile_export.families`.
"""

from __future__ import annotations

from mobile_export.modeling.attention import (
    AttentionSpec,
    CachedAttention,
    FullCausal,
    Masking,
    SlidingWindow,
    StepContext,
    additive_causal_mask,
)
from mobile_export.modeling.attention_kinds import ATTENTION_KINDS, AttentionKind, attention_kind, load_custom_ops
from mobile_export.modeling.attention_onnx import OnnxAttention
from mobile_export.modeling.attention_portable import PortableAttention
from mobile_export.modeling.decoder import SUPPORTED_MODEL_TYPES, ExportableDecoder, check_supported
from mobile_export.modeling.entries import CoreMLEntry, OnnxEntry, dynamic_shapes, example_inputs
from mobile_export.modeling.norms import ExportRMSNorm
from mobile_export.modeling.rope import apply_rope, apply_rope_sliced, rotate_half_matrix

__all__ = [
    "ATTENTION_KINDS",
    "SUPPORTED_MODEL_TYPES",
    "AttentionKind",
    "AttentionSpec",
    "CachedAttention",
    "CoreMLEntry",
    "ExportRMSNorm",
    "ExportableDecoder",
    "FullCausal",
    "Masking",
    "OnnxAttention",
    "OnnxEntry",
    "PortableAttention",
    "SlidingWindow",
    "StepContext",
    "additive_causal_mask",
    "apply_rope",
    "apply_rope_sliced",
    "attention_kind",
    "check_supported",
    "dynamic_shapes",
    "example_inputs",
    "load_custom_ops",
    "rotate_half_matrix",
]
