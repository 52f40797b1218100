"""Model families that describe themselves: one frozen :class:`ModelFamily` record per ``model_type``.

Each record says how that family's transformers modules differ from a plain Llama block, so
the export wrapper (:mod:`mobile_export.modeling`), the rotation (``--rotate``), the ONNX
Runtime GenAI config and the tests all read one place instead of keeping lists of names:

- fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``), split by the wrapper;
- the RMSNorm form (``w * x`` or Gemma's ``(1 + w) * x``), per-head q/k norms, and "sandwich"
  norms after attention and MLP (which the rotation cannot fold);
- rope: whether each layer type has its own rotary table (Gemma 3's local/global layers);
- attention and final logit soft-capping, sliding windows, scaled embeddings;
- ONNX Runtime GenAI's name for the family, and a tiny config for the tests.

Adding a family: one module in this package with a ``FAMILIES`` tuple, listed in
:data:`FAMILY_MODULES`, plus the parity tests it then gets for free (``tests/test_modeling.py``).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from types import MappingProxyType

from mobile_export.errors import UserError

# The modules holding the records, in the order their model types are listed to users.
FAMILY_MODULES: tuple[str, ...] = ("llama", "qwen", "phi3", "gemma")


class Window(StrEnum):
    """Where a family's sliding window applies."""

    NONE = "none"  # the wrapper attends to every earlier position
    LAYER_TYPES = "layer_types"  # layers whose ``config.layer_types`` entry is "sliding_attention"


@dataclass(frozen=True)
class ModelFamily:
    """What the export wrapper needs to know about one transformers ``model_type``."""

    model_type: str
    genai_type: str | None  # ONNX Runtime GenAI's model type; None: it has none for this family
    tiny_config: Mapping[str, object]  # transformers config arguments of a tiny test model
    fused_qkv: bool = False  # one ``qkv_proj`` for q, k and v (Phi-3)
    fused_gate_up: bool = False  # one ``gate_up_proj`` for the MLP's gate and up (Phi-3)
    norm_offset: float = 0.0  # RMSNorm scale is ``norm_offset + weight`` (Gemma: 1)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # norms after attention and MLP as well (Gemma 2/3)
    rope_by_layer_type: bool = False  # each ``config.layer_types`` entry has its own rope (Gemma 3)
    attention_softcap: bool = False  # ``config.attn_logit_softcapping`` applies (when set)
    final_softcap: bool = False  # ``config.final_logit_softcapping`` applies (when set)
    sliding_window: Window = Window.NONE  # see :class:`Window`
    scaled_embeddings: bool = False  # embeddings times sqrt(hidden_size), inside the embedding module
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sliding_window", Window(self.sliding_window))  # ValueError when unknown
        object.__setattr__(self, "tiny_config", MappingProxyType(dict(self.tiny_config)))

    def tiny_config_arguments(self) -> dict:
        """A fresh copy of :attr:`tiny_config` (transformers may rewrite nested dicts such as rope_scaling)."""
        return copy.deepcopy(dict(self.tiny_config))

    @property
    def rotatable(self) -> bool:
        """Whether ``--rotate`` folds exactly: only plain pre-norm blocks (no sandwich norms)."""
        return not self.sandwich_norms

    def window_of_layer(self, config, index: int) -> int | None:
        """The sliding window of decoder layer ``index`` (None: attends to all earlier positions)."""
        if self.sliding_window == Window.NONE:
            return None
        layer_types = getattr(config, "layer_types", None) or []
        if index < len(layer_types) and layer_types[index] == "sliding_attention":
            return getattr(config, "sliding_window", None)
        return None

    def attention_softcap_of(self, config) -> float | None:
        return getattr(config, "attn_logit_softcapping", None) if self.attention_softcap else None

    def final_softcap_of(self, config) -> float | None:
        return getattr(config, "final_logit_softcapping", None) if self.final_softcap else None

    def rope_layer_type(self, config, index: int) -> str | None:
        """Which rotary table layer ``index`` reads (None: the one table of the model)."""
        return config.layer_types[index] if self.rope_by_layer_type else None


@cache
def _registry() -> dict[str, ModelFamily]:
    found: dict[str, ModelFamily] = {}
    for name in FAMILY_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        for family in module.FAMILIES:
            if family.model_type in found:
                raise ValueError(f"model type '{family.model_type}' is registered twice (again in {name}.py)")
            found[family.model_type] = family
    return found


def all_families() -> tuple[ModelFamily, ...]:
    """Every registered family, in the order model types are listed to users."""
    return tuple(_registry().values())


def model_types() -> tuple[str, ...]:
    """Every registered ``model_type``."""
    return tuple(_registry())


def get_family(model_type: str | None) -> ModelFamily:
    """The record of ``model_type``; a :class:`UserError` naming what is supported otherwise."""
    family = _registry().get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise UserError(
            f"unsupported architecture '{model_type}'",
            hint="supported model types: " + ", ".join(model_types()),
        )
    return family


def family_of(config) -> ModelFamily:
    """The record of a transformers config's ``model_type`` (see :func:`get_family`)."""
    return get_family(getattr(config, "model_type", None))
