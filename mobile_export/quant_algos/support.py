"""What each backend's quantization accepts, checked before any heavy work: algorithms,
rotation, ``--keep-8bit`` and the embedding's own groups, and that every ``--keep-8bit`` pattern
names a layer."""

from __future__ import annotations

from torch import nn

from mobile_export.errors import UserError
from mobile_export.quantize import (
    CALIBRATED,
    LINEAR_NAME_EXAMPLES,
    QuantSpec,
    keep_8bit_matcher,
    projection_parts,
)

# What each backend takes (algorithms, rotation, keep-8bit, per-layer groups) is declared on its
# class in mobile_export.backends; the checks below read those declarations.


def check_algorithm_support(backend, spec: QuantSpec, calib_text) -> None:
    """Refuse, before any heavy work, an algorithm, rotation or 8-bit rule the backend cannot take,
    and a calibrated algorithm without calibration text."""
    algos = backend.quant_algos
    if spec.algo not in algos:
        raise UserError(
            f"--quant-algo {spec.algo} is not available for backend {backend.name}",
            hint=backend.algo_hint or "available: " + ", ".join(algos),
        )
    if spec.rotate and not backend.rotates:
        raise UserError(f"--rotate is not available for backend {backend.name}", hint="leave out --rotate")
    if spec.keep_8bit and not backend.keeps_8bit():
        raise UserError(
            f"--keep-8bit is not available for backend {backend.name}",
            hint="its compression is applied by the converter to every layer alike",
        )
    if spec.group_sizes and not backend.group_patterns:
        from mobile_export.backends import backend_classes

        able = [cls.name for cls in backend_classes() if cls.group_patterns]
        raise UserError(
            f"--group-size-for is not available for backend {backend.name}",
            hint="available for: " + ", ".join(able) + "; use --group-size for every layer",
        )
    if spec.embedding_group_size is not None and not backend.embedding_groups():
        raise UserError(
            f"--embedding-group-size is not available for backend {backend.name}",
            hint="its embedding table is quantized by the converter with --group-size",
        )
    torch_chosen = spec.algo in CALIBRATED or (spec.algo == "hqq" and backend.torch_grid)
    if torch_chosen and not backend.takes_torch_integers(spec.scheme):
        raise UserError(
            f"--quant-algo {spec.algo} is not available for {backend.name} {spec.scheme}",
            hint="use --quant int4 or int8 with it, or --quant-algo rtn",
        )
    if spec.keep_8bit and not backend.takes_torch_integers(spec.scheme):
        raise UserError(
            f"--keep-8bit is not available for {backend.name} {spec.scheme}",
            hint="use --quant int4 with it, or leave out --keep-8bit",
        )
    if spec.algo in CALIBRATED and calib_text is not None and not calib_text.is_file():
        raise UserError(f"calibration text {calib_text} does not exist", hint="pass --calib-text FILE (plain text)")


def linear_names(decoder) -> list[str]:
    """Names of the decoder's linears as ``--keep-8bit`` and ``--group-size-for`` patterns see them
    (a fused ``qkv_proj`` answers to its q, k and v projections), then lm_head and embed_tokens."""
    names = []
    for i, layer in enumerate(decoder.layers):
        for n, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                names += [f"layers.{i}.{part}" for part in projection_parts(n)]
    return [*names, "lm_head", "embed_tokens"]


def check_keep_patterns(decoder, spec: QuantSpec) -> None:
    """Refuse a ``--keep-8bit`` or ``--group-size-for`` pattern that names no quantizable module."""
    if not spec.keep_8bit and not spec.group_sizes:
        return
    names = linear_names(decoder)
    rules = [("--keep-8bit", p) for p in spec.keep_8bit] + [("--group-size-for", p) for p, _ in spec.group_sizes]
    for option, pattern in rules:
        if not any(keep_8bit_matcher((pattern,), len(decoder.layers))(n) for n in names):
            raise UserError(f"{option} '{pattern}' matches no layer", hint=f"names look like: {LINEAR_NAME_EXAMPLES}")
