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

How the integers are chosen (``--quant-algo``, see :mod:`mobile_export.quant_algos`): ``rtn``
(round to nearest, torchao's affine qparams), ``hqq`` (torchao's half-quadratic scale-only
qparams, no calibration), ``gptq`` and ``awq`` (calibrated on ``--calib-text``). ``--rotate``
folds an orthogonal rotation of the residual stream into the weights first. ``--keep-8bit``
keeps the linears it names at 8 bits (int8 per channel, the ``int8`` scheme's kernel).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mobile_export.errors import UserError

LINEAR_SCHEMES: tuple[str, ...] = ("fp32", "fp16", "8da4w", "int8", "int4", "palettize4", "palettize6")
UNQUANTIZED: tuple[str, ...] = ("fp32", "fp16")
EMBEDDING_SCHEMES: tuple[str, ...] = ("none", "int8", "int4")
GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
ALGORITHMS: tuple[str, ...] = ("rtn", "hqq", "gptq", "awq")
CALIBRATED: tuple[str, ...] = ("gptq", "awq")
# Linear layers' names inside the export wrapper, for --keep-8bit patterns.
LINEAR_NAME_EXAMPLES = "lm_head, layers.0.self_attn.q_proj, layers.{last}.mlp.down_proj, embed_tokens"


# How a manifest's ``quantization.embedding`` marks a table tied to the LM head (Core ML: one
# weight, compressed as the head is); written and read only through the two functions below.
SHARED_WITH_HEAD = " (shared with the LM head)"


def embedding_entry(embedding: str, shared_with_head: bool) -> str:
    """The manifest's ``quantization.embedding`` value."""
    return embedding + SHARED_WITH_HEAD if shared_with_head else embedding


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how; validated on construction."""

    scheme: str = "8da4w"
    group_size: int = 32
    embedding: str = "none"
    weight_only: bool = False  # int8 without dynamic activation quantization (Core ML delegates)
    algo: str = "rtn"
    rotate: bool = False
    keep_8bit: tuple[str, ...] = ()
    embedding_group_size: int | None = None  # int4 embedding groups; None: ``group_size``
    group_sizes: tuple[tuple[str, int], ...] = ()  # (pattern, group size) for the linears it names (onnx)

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
        if self.embedding_group_size is not None and (
            self.embedding != "int4" or not 16 <= self.embedding_group_size <= 8192
        ):
            raise UserError(
                f"embedding group size {self.embedding_group_size} needs --embedding-quant int4 and 16..8192",
                hint="leave out --embedding-group-size, or use it with --embedding-quant int4",
            )
        if self.algo not in ALGORITHMS:
            raise UserError(
                f"unknown quantization algorithm '{self.algo}'", hint="choose one of: " + ", ".join(ALGORITHMS)
            )
        if self.algo != "rtn" and self.scheme in UNQUANTIZED:
            raise UserError(
                f"--quant-algo {self.algo} needs a quantized scheme, not {self.scheme}",
                hint="use --quant 8da4w (or int4/int8), or leave out --quant-algo",
            )
        if self.keep_8bit and self.scheme in UNQUANTIZED:
            raise UserError(f"--keep-8bit has nothing to keep with --quant {self.scheme}", hint="leave it out")
        for pattern, size in self.group_sizes:
            if size not in GROUP_SIZES:
                raise UserError(
                    f"--group-size-for '{pattern}={size}': unsupported group size {size}",
                    hint="choose one of: " + ", ".join(map(str, GROUP_SIZES)),
                )
        if self.group_sizes and self.scheme not in ("8da4w", "int4"):
            raise UserError(f"--group-size-for has no groups to size with --quant {self.scheme}", hint="leave it out")
        for pattern in (*self.keep_8bit, *(p for p, _ in self.group_sizes)):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise UserError(f"layer pattern '{pattern}' is not a valid regular expression: {exc}") from exc

    @classmethod
    def from_manifest(cls, quantization: dict) -> QuantSpec:
        """The spec a bundle manifest's ``quantization`` section records (see
        ``manifest.quantization_section``); a section no valid spec could write raises UserError."""
        scheme = str(quantization.get("scheme"))
        group_size = int(quantization.get("group_size") or 32)
        embedding = str(quantization.get("embedding") or "none").removesuffix(SHARED_WITH_HEAD)
        embedding_groups = quantization.get("embedding_group_size")
        keep = quantization.get("keep_8bit") or {}
        return cls(
            scheme=scheme,
            group_size=group_size,
            embedding=embedding,
            algo=str(quantization.get("algorithm") or "rtn"),
            rotate=bool(quantization.get("rotate")),
            keep_8bit=tuple(keep.get("patterns") or ()) if isinstance(keep, dict) else (),
            embedding_group_size=(
                int(embedding_groups) if embedding == "int4" and embedding_groups not in (None, group_size) else None
            ),
            group_sizes=tuple((str(p), int(n)) for p, n in (quantization.get("group_sizes") or {}).items()),
        )

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. '8da4w-g32 gptq + rotate + emb int8'."""
        grouped = {"8da4w": "g", "int4": "b"}
        linear = f"{self.scheme}-{grouped[self.scheme]}{self.group_size}" if self.scheme in grouped else self.scheme
        if self.algo != "rtn":
            linear += f" {self.algo}"
        if self.rotate:
            linear += " + rotate"
        if self.group_sizes:
            sizes = sorted({size for _, size in self.group_sizes})
            n = len(self.group_sizes)
            linear += f" ({'/'.join(map(str, sizes))} for {n} pattern{'s' if n > 1 else ''})"
        if self.keep_8bit:
            more = len(self.keep_8bit) - 2
            named = ",".join(self.keep_8bit if more <= 0 else self.keep_8bit[:2])
            linear += " + 8-bit " + named + (f" and {more} more" if more > 0 else "")
        if self.embedding == "none":
            return linear
        grouped_emb = f" g{self.embedding_group_size}" if self.embedding_group_size else ""
        return f"{linear} + emb {self.embedding}{grouped_emb}"

    @property
    def embedding_groups(self) -> int:
        """Columns per scale of an int4 embedding table."""
        return self.embedding_group_size or self.group_size

    @property
    def bits(self) -> int:
        """Bits per linear weight of the scheme (16/32 for unquantized ones)."""
        return {"8da4w": 4, "int4": 4, "int8": 8, "fp16": 16, "palettize4": 4, "palettize6": 6}.get(self.scheme, 32)

    @property
    def dynamic_activation(self) -> bool:
        """Whether linears quantize activations to int8 per token at run time."""
        return self.scheme == "8da4w" or (self.scheme == "int8" and not self.weight_only)

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
    kept_8bit: list[str] = field(default_factory=list)
    extra_bytes_8bit: int = 0  # estimated bytes the 8-bit layers add over the scheme's
    details: dict = field(default_factory=dict)  # algorithm facts for the manifest


def keep_8bit_matcher(patterns: tuple[str, ...], n_layers: int) -> Callable[[str], bool]:
    """Whether a module name (``lm_head``, ``layers.3.mlp.down_proj``, ``embed_tokens``) is kept at 8 bits.

    Patterns are globs (``layers.0.*``), ``re:``-prefixed regular expressions, or a module's name,
    which keeps everything inside it (``layers.0``); ``{last}`` is the last layer's index.
    """
    resolved = [p.replace("{last}", str(n_layers - 1)) for p in patterns]

    def matches(name: str) -> bool:
        for pattern in resolved:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], name):
                    return True
            elif fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + "."):
                return True
        return False

    return matches


def _qparams_algorithm(spec: QuantSpec):
    """torchao's choice of scales: HQQ's scale-only optimisation for ``hqq``, else min-max."""
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    return IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if spec.algo == "hqq" else IntxChooseQParamsAlgorithm.AFFINE


def _linear_config(spec: QuantSpec, bits: int | None = None):
    """torchao config of the scheme (or of its 8-bit per-channel variant when ``bits`` is 8)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    algorithm = _qparams_algorithm(spec)
    bits = bits or spec.bits
    if not spec.dynamic_activation:  # weight-only, for delegates that dequantize on the fly (Core ML)
        granularity = PerGroup(spec.group_size) if bits == 4 else PerAxis(0)
        return IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"), granularity=granularity, intx_choose_qparams_algorithm=algorithm
        )
    if bits == 4:
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4,
            weight_granularity=PerGroup(spec.group_size),
            intx_choose_qparams_algorithm=algorithm,
        )
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int8, weight_granularity=PerAxis(0), intx_choose_qparams_algorithm=algorithm
    )


def _embedding_config(spec: QuantSpec, bits: int | None = None):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    algorithm = _qparams_algorithm(spec)
    if (bits or {"int8": 8, "int4": 4}[spec.embedding]) == 8:
        return IntxWeightOnlyConfig(
            weight_dtype=torch.int8, granularity=PerAxis(0), intx_choose_qparams_algorithm=algorithm
        )
    return IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=PerGroup(spec.embedding_groups), intx_choose_qparams_algorithm=algorithm
    )


def _linear_fits(spec: QuantSpec, module: nn.Linear) -> bool:
    return not spec.uses_groups or module.in_features % spec.group_size == 0


def projection_parts(name: str) -> list[str]:
    """The projections one linear computes, as layer patterns name them: a fused ``qkv_proj``
    (one matmul for GroupQueryAttention's packed input) is its q, k and v projections."""
    if name.endswith("qkv_proj"):
        return [name.replace("qkv_proj", part) for part in ("q_proj", "k_proj", "v_proj")]
    return [name]


def linear_bits(spec: QuantSpec, name: str, keep: Callable[[str], bool] | None) -> int:
    """Bits for the linear called ``name``: 8 when ``--keep-8bit`` names it, else the scheme's."""
    return 8 if keep is not None and spec.bits < 8 and keep(name) else spec.bits


def linear_group(spec: QuantSpec, name: str, n_layers: int) -> int:
    """Group size of the linear called ``name``: the first ``group_sizes`` pattern naming it, else the scheme's."""
    for pattern, size in spec.group_sizes:
        if keep_8bit_matcher((pattern,), n_layers)(name):
            return size
    return spec.group_size


def extra_bytes_8bit(spec: QuantSpec, linear: nn.Linear) -> int:
    """Estimated bytes an 8-bit per-channel linear adds over the scheme's 4-bit groups
    (XNNPACK stores group scales in bf16, channel scales in fp32)."""
    out, cols = linear.out_features, linear.in_features
    four = out * cols // 2 + out * (cols // spec.group_size) * 2
    return out * cols + out * 4 - four


def select_linears(
    module: nn.Module, spec: QuantSpec, report: QuantReport, prefix: str = "", keep: Callable[[str], bool] | None = None
) -> dict[str, int]:
    """The linears of ``module`` to quantize, with their bits; reports the ones left in fp32
    and the ones kept at 8 bits (with their size cost)."""
    skipped = report.skipped_linears if report.skipped_linears is not None else []
    report.skipped_linears = skipped
    chosen: dict[str, int] = {}
    for name, child in module.named_modules():
        if not isinstance(child, nn.Linear):
            continue
        bits = linear_bits(spec, f"{prefix}{name}", keep)
        if bits == 8 and spec.bits < 8:
            chosen[name] = 8
            report.kept_8bit.append(f"{prefix}{name}")
            if spec.uses_groups and child.in_features % spec.group_size == 0:
                report.extra_bytes_8bit += extra_bytes_8bit(spec, child)
        elif _linear_fits(spec, child):
            chosen[name] = bits
        else:
            skipped.append(f"{prefix}{name} (in_features {child.in_features} not a multiple of {spec.group_size})")
    return chosen


def quantize_module(
    module: nn.Module, spec: QuantSpec, report: QuantReport, prefix: str = "", keep: Callable[[str], bool] | None = None
) -> None:
    """Quantize the linear layers of ``module`` in place with torchao (weights first cast to fp32):
    round to nearest, or HQQ's scales; ``keep`` names the linears kept at 8 bits.

    Called one decoder layer at a time so a large model never holds two full-precision
    copies of its weights.
    """
    from torchao.quantization import quantize_

    module.float()
    if spec.scheme in UNQUANTIZED:
        return
    chosen = select_linears(module, spec, report, prefix, keep)
    with torch.no_grad():
        for bits in sorted(set(chosen.values())):
            selected = {name for name, b in chosen.items() if b == bits}
            quantize_(module, _linear_config(spec, bits), filter_fn=lambda m, fqn, sel=selected: fqn in sel)
        if spec.dynamic_activation and spec.uses_groups:
            for name, bits in chosen.items():
                if bits == 4:
                    round_group_scales_bf16(module.get_submodule(name).weight)
    report.quantized_linears += len(chosen)


def round_group_scales_bf16(weight) -> None:
    """Round a torchao 4-bit grouped weight's scales to bf16 in place: XNNPACK's qd8-qb4w kernels
    store group scales in bf16, so the eager model (the lowering-parity reference) must compute
    with those same values, or the two drift apart layer by layer (measured on SmolLM2-135M)."""
    weight.scale.copy_(weight.scale.to(torch.bfloat16).float())


def untie_lm_head(lm_head: nn.Linear, embedding: nn.Embedding) -> None:
    """Give the LM head its own weight so head and embedding can be quantized differently."""
    if lm_head.weight is embedding.weight or lm_head.weight.data_ptr() == embedding.weight.data_ptr():
        lm_head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)


def quantize_embedding(
    embedding: nn.Embedding, spec: QuantSpec, report: QuantReport, keep: Callable[[str], bool] | None = None
) -> None:
    """Quantize an embedding table in place (weight-only), or just cast it to fp32; an int4 table
    that ``keep`` names (``embed_tokens``) is stored as int8."""
    from torchao.quantization import quantize_

    embedding.float()
    if spec.embedding == "none":
        return
    bits = 8 if spec.embedding == "int8" or (keep is not None and keep("embed_tokens")) else 4
    if bits == 8 and spec.embedding == "int4":
        report.kept_8bit.append("embed_tokens")
        rows, dim = embedding.weight.shape
        report.extra_bytes_8bit += rows * dim // 2 + rows * 4 - (rows * dim // spec.embedding_groups) * 4
    if bits == 4 and embedding.embedding_dim % spec.embedding_groups != 0:
        raise UserError(
            f"embedding width {embedding.embedding_dim} is not a multiple of group size {spec.embedding_groups}",
            hint="use --embedding-quant int8 or an --embedding-group-size that divides it",
        )
    holder = nn.ModuleDict({"embed": embedding})
    with torch.no_grad():
        quantize_(holder, _embedding_config(spec, bits), filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    report.quantized_embeddings += 1
