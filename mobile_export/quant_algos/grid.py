"""The integer grid of torchao's intx schemes, and torchao weights built from our own integers.

torchao's ``Int8DynamicActivationIntxWeightConfig`` / ``IntxWeightOnlyConfig`` with symmetric
mapping (``MappingType.SYMMETRIC``, the default) quantize ``w`` in groups of ``group_size``
input columns (one group per row for per-channel) to ``q = clamp(round(w * (1 / s)), qmin, qmax)``
with ``s = max|w| / ((qmax - qmin) / 2)`` (``max|w| / 7.5`` for int4, range -8..7), zero point 0,
and store the result as an ``IntxUnpackedToInt8Tensor`` (int8 ``qdata``, ``scale`` of shape
``[out, in / group_size]``). :func:`intx_weight` builds that same tensor from integers and
scales an algorithm chose, so export and XNNPACK lowering see exactly what ``quantize_``
produces.
"""

from __future__ import annotations

import torch
from torch import nn

SCALE_EPS = torch.finfo(torch.float32).smallest_normal


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits`` bits, e.g. (-8, 7) for 4."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in / group_size, group_size]."""
    out, cols = w.shape
    return w.reshape(out, cols // group_size, group_size)


def symmetric_scale(w: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """torchao's symmetric scale of each row of ``w`` [..., n] (optionally of a clipped maximum)."""
    qmin, qmax = qrange(bits)
    amax = w.abs().amax(dim=-1) * clip
    return (amax / ((qmax - qmin) / 2)).clamp(min=SCALE_EPS)


def group_scales(w: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Scales [out, in / group_size] of plain round-to-nearest (what torchao's affine picks)."""
    return symmetric_scale(group_view(w.float(), group_size), bits)


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers (as floats) of ``w`` on the grid of ``scale`` (broadcast), torchao's rounding."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(w * (1.0 / scale)), qmin, qmax)


def quantize_grouped(w: torch.Tensor, scale: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """int8 integers [out, in] of ``w`` with per-group ``scale`` [out, in / group_size]."""
    q = quantize_columns(group_view(w.float(), group_size), scale[..., None], bits)
    return q.reshape(w.shape).to(torch.int8)


def dequantize_grouped(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 weights [out, in] from integers and per-group scales."""
    return (group_view(q.float(), group_size) * scale[..., None]).reshape(q.shape)


def fake_quantize(w: torch.Tensor, group_size: int, bits: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Round-to-nearest on the grid, dequantized (scales from the optionally clipped group maxima)."""
    groups = group_view(w.float(), group_size)
    scale = symmetric_scale(groups, bits, clip)[..., None]
    return (quantize_columns(groups, scale, bits) * scale).reshape(w.shape)


def intx_weight(
    qdata: torch.Tensor, scale: torch.Tensor, group_size: int, bits: int, dynamic_activation: bool
) -> torch.Tensor:
    """torchao's ``IntxUnpackedToInt8Tensor`` from our integers: the tensor ``quantize_`` would put
    in a linear's weight for 8da4w/8da8w (``dynamic_activation``) or intx weight-only."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    qmin, qmax = qrange(bits)
    if int(qdata.min()) < qmin or int(qdata.max()) > qmax:
        raise ValueError(f"integers outside the int{bits} range {qmin}..{qmax}")
    activation = IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN if dynamic_activation else None
    return IntxUnpackedToInt8Tensor(
        qdata=qdata.to(torch.int8).contiguous(),
        scale=scale.float().contiguous(),
        zero_point=torch.zeros(scale.shape, dtype=torch.int8),
        target_dtype=getattr(torch, f"int{bits}"),
        block_size=(1, group_size),
        dtype=torch.float32,
        activation_quantization=activation,
    )


def install_weight(
    linear: nn.Linear, qdata: torch.Tensor, scale: torch.Tensor, group_size: int, bits: int, dynamic_activation: bool
) -> None:
    """Replace ``linear``'s weight with torchao's intx tensor of ``qdata`` and ``scale``."""
    weight = intx_weight(qdata, scale, group_size, bits, dynamic_activation)
    linear.weight = nn.Parameter(weight, requires_grad=False)


COREML_PREFIX = "_COREML_/weight/"  # coremltools' torch frontend reads these buffers as compression info


def attach_coreml_quantization(
    linear: nn.Linear, qdata: torch.Tensor, scale: torch.Tensor, group_size: int, bits: int
) -> None:
    """Give ``linear`` the grid's weights plus coremltools' compression-info buffers, so
    ``ct.convert`` stores exactly these integers and scales (a ``constexpr_blockwise_shift_scale``
    op) instead of re-quantizing the weights itself."""
    linear.weight.data = dequantize_grouped(qdata, scale, group_size).to(linear.weight.dtype)
    linear.register_buffer(COREML_PREFIX + "compression_type", torch.tensor([3]))  # quantization
    linear.register_buffer(COREML_PREFIX + "quantization_n_bits", torch.tensor(bits))
    linear.register_buffer(COREML_PREFIX + "quantization_scale", scale.float().clone())
