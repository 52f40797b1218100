"""What each backend's quantization accepts, checked before any heavy work: algorithms,
rotation, ``--keep-8bit`` and the embedding's own groups, and that every ``--keep-8bit`` pattern
names a layer."""

from __future__ import annotations

from torch import nn

from mobile_export.errors import UserError
from mobile_export.quantize import (
    ALGORITHMS,
    CALIBRATED,
    LINEAR_NAME_EXAMPLES,
    QuantSpec,
    keep_8bit_matcher,
    projection_parts,
)

BACKEND_ALGOS: dict[str, tuple[str, ...]] = {
    "xnnpack": ALGORITHMS,
    "coreml-executorch": ALGORITHMS,
    "coreml": ALGORITHMS,  # hqq, and --keep-8bit, through integers chosen in torch
    "onnx": ("rtn", "hqq"),  # ONNX Runtime's MatMulNBitsQuantizer (default RTN, HQQ)
}
ALGO_HINTS: dict[str, str] = {
    "onnx": "ONNX Runtime's quantizer offers rtn and hqq here; use --quant-algo rtn or hqq",
}
ROTATE_BACKENDS: tuple[str, ...] = ("xnnpack", "coreml", "coreml-executorch")
# converters that can store integers chosen in torch (coremltools' compression-info buffers): with
# hqq or --keep-8bit, torch picks every integer and scale instead of the converter's round-to-nearest
TORCH_GRID_BACKENDS: tuple[str, ...] = ("coreml",)
# converters that quantize layer by layer, so each layer can take its own bits (and, onnx, its own
# groups): ONNX Runtime's quantizer runs once per (bits, block size), on the nodes that take them
PER_LAYER_BACKENDS: tuple[str, ...] = (*TORCH_GRID_BACKENDS, "onnx")
GROUP_PATTERN_BACKENDS: tuple[str, ...] = ("onnx",)


def check_algorithm_support(backend, spec: QuantSpec, calib_text) -> None:
    """Refuse, before any heavy work, an algorithm, rotation or 8-bit rule the backend cannot take,
    and a calibrated algorithm without calibration text."""
    algos = getattr(backend, "quant_algos", None) or BACKEND_ALGOS.get(backend.name, ("rtn",))
    if spec.algo not in algos:
        raise UserError(
            f"--quant-algo {spec.algo} is not available for backend {backend.name}",
            hint=ALGO_HINTS.get(backend.name, "available: " + ", ".join(algos)),
        )
    if spec.rotate and backend.name not in ROTATE_BACKENDS:
        raise UserError(f"--rotate is not available for backend {backend.name}", hint="leave out --rotate")
    if spec.keep_8bit and not (backend.quantizes_in_torch or backend.name in PER_LAYER_BACKENDS):
        raise UserError(
            f"--keep-8bit is not available for backend {backend.name}",
            hint="its compression is applied by the converter to every layer alike",
        )
    if spec.group_sizes and backend.name not in GROUP_PATTERN_BACKENDS:
        raise UserError(
            f"--group-size-for is not available for backend {backend.name}",
            hint="available for: " + ", ".join(GROUP_PATTERN_BACKENDS) + "; use --group-size for every layer",
        )
    if spec.embedding_group_size is not None and not (backend.quantizes_in_torch or backend.name == "onnx"):
        raise UserError(
            f"--embedding-group-size is not available for backend {backend.name}",
            hint="its embedding table is quantized by the converter with --group-size",
        )
    torch_chosen = spec.algo in CALIBRATED or (spec.algo == "hqq" and backend.name in TORCH_GRID_BACKENDS)
    if torch_chosen and not backend.quantizes_in_torch and spec.scheme not in ("int4", "int8"):
        raise UserError(
            f"--quant-algo {spec.algo} is not available for {backend.name} {spec.scheme}",
            hint="use --quant int4 or int8 with it, or --quant-algo rtn",
        )
    if spec.keep_8bit and not backend.quantizes_in_torch and spec.scheme not in ("int4", "int8"):
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
