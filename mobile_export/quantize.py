"""Quantization schemes by name, applied with torchao so XNNPACK lowering recognises them.

Schemes (``--quant``); each backend accepts a subset (see ``Backend.schemes``):

- ``fp32`` / ``fp16``: no weight quantization (fp16: Core ML's storage and compute precision).
- ``8da4w``: int8 dynamic per-token activations, int4 symmetric weights in groups of
  ``group_size`` (32/64/128) along the input dimension. XNNPACK runs this as qd8-qb4w.
- ``int8``: int8 symmetric per-channel weights. XNNPACK runs them as qd8-qc8w: activations
  are quantized to int8 per token at run time. (ExecuTorch 1.5's XNNPACK delegate has no
  weight-only int8 linear that keeps int8 storage: a dequantize-then-linear program comes out
  with fp32 weights, measured; so weight-only int8 is not offered on this backend.)

Embeddings (``--embedding-quant``): ``none``, ``int8`` (per row) or ``int4`` (per group of
``group_size``), weight-only; at run time they use ExecuTorch's quantized embedding kernels.
Linear layers whose input width is not a multiple of the group size stay in fp32 and are
reported, never silently quantized differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mobile_export.errors import UserError

LINEAR_SCHEMES: tuple[str, ...] = ("fp32", "fp16", "8da4w", "int8", "int4", "palettize4", "palettize6")
UNQUANTIZED: tuple[str, ...] = ("fp32", "fp16")
EMBEDDING_SCHEMES: tuple[str, ...] = ("none", "int8", "int4")
GROUP_SIZES: tuple[int, ...] = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how; validated on construction."""

    scheme: str = "8da4w"
    group_size: int = 32
    embedding: str = "none"
    weight_only: bool = False  # int8 without dynamic activation quantization (Core ML delegates)

    def __post_init__(self) -> None:
        if self.scheme not in LINEAR_SCHEMES:
            raise UserError(
                f"unknown quantization scheme '{self.scheme}'",
                hint="choose one of: " + ", ".join(LINEAR_SCHEMES),
            )
        if self.embedding not in EMBEDDING_SCHEMES:
            raise UserError(
                f"unknown embedding quantization '{self.embedding}'",
                hint="choose one of: " + ", ".join(EMBEDDING_SCHEMES),
            )
        if self.group_size not in GROUP_SIZES:
            raise UserError(
                f"unsupported group size {self.group_size}",
                hint="choose one of: " + ", ".join(map(str, GROUP_SIZES)),
            )

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. '8da4w-g32 + emb int8'."""
        grouped = {"8da4w": "g", "int4": "b"}
        linear = f"{self.scheme}-{grouped[self.scheme]}{self.group_size}" if self.scheme in grouped else self.scheme
        return linear if self.embedding == "none" else f"{linear} + emb {self.embedding}"

    @property
    def is_quantized(self) -> bool:
        """Whether any weight is stored below fp32."""
        return self.scheme not in UNQUANTIZED or self.embedding != "none"

    @property
    def uses_groups(self) -> bool:
        """Whether ``group_size`` means anything for the linear scheme."""
        return self.scheme in ("8da4w", "int4")


@dataclass
class QuantReport:
    """What quantization actually did, counted from the modules."""

    quantized_linears: int = 0
    skipped_linears: list[str] | None = None
    quantized_embeddings: int = 0


def _linear_config(spec: QuantSpec):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if spec.scheme == "int4":  # weight-only, for delegates that dequantize on the fly (Core ML)
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(spec.group_size))
    if spec.scheme == "int8" and spec.weight_only:
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    if spec.scheme == "8da4w":
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(spec.group_size)
        )
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))


def _embedding_config(spec: QuantSpec):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if spec.embedding == "int8":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(spec.group_size))


def _linear_fits(spec: QuantSpec, module: nn.Linear) -> bool:
    return not spec.uses_groups or module.in_features % spec.group_size == 0


def quantize_module(module: nn.Module, spec: QuantSpec, report: QuantReport, prefix: str = "") -> None:
    """Quantize the linear layers of ``module`` in place (weights first cast to fp32).

    Called one decoder layer at a time so a large model never holds two full-precision
    copies of its weights.
    """
    from torchao.quantization import quantize_

    module.float()
    if spec.scheme in UNQUANTIZED:
        return
    skipped = report.skipped_linears if report.skipped_linears is not None else []
    report.skipped_linears = skipped
    chosen: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            if _linear_fits(spec, child):
                chosen.append(name)
            else:
                skipped.append(f"{prefix}{name} (in_features {child.in_features} not a multiple of {spec.group_size})")
    if not chosen:
        return
    selected = set(chosen)
    with torch.no_grad():
        quantize_(module, _linear_config(spec), filter_fn=lambda m, fqn: fqn in selected)
    report.quantized_linears += len(chosen)


def untie_lm_head(lm_head: nn.Linear, embedding: nn.Embedding) -> None:
    """Give the LM head its own weight so head and embedding can be quantized differently."""
    if lm_head.weight is embedding.weight or lm_head.weight.data_ptr() == embedding.weight.data_ptr():
        lm_head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)


def quantize_embedding(embedding: nn.Embedding, spec: QuantSpec, report: QuantReport) -> None:
    """Quantize an embedding table in place (weight-only), or just cast it to fp32."""
    from torchao.quantization import quantize_

    embedding.float()
    if spec.embedding == "none":
        return
    if spec.embedding == "int4" and embedding.embedding_dim % spec.group_size != 0:
        raise UserError(
            f"embedding width {embedding.embedding_dim} is not a multiple of group size {spec.group_size}",
            hint="use --embedding-quant int8 or another --group-size",
        )
    holder = nn.ModuleDict({"embed": embedding})
    with torch.no_grad():
        quantize_(holder, _embedding_config(spec), filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    report.quantized_embeddings += 1
