"""Rotary embedding in the export graph: transformers' half-split convention, in two spellings.

The cos/sin tables themselves come from transformers' own rotary modules
(:mod:`mobile_export.rope_tables`); rows past the rotary width hold cos 1 and sin 0, so
partial-rotary models need no slicing.
"""

from __future__ import annotations

import torch
from torch import nn


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


def apply_rope_sliced(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotary embedding with rotate-half written as slices (converters that slice freely, e.g. Core ML).

    Same layout as :func:`apply_rope`; dims past ``rotary_dim`` have sin 0, so whatever the
    rotated term holds there is multiplied away.
    """
    half = rotary_dim // 2
    rotated = torch.cat([-x[..., half:rotary_dim], x[..., :half], x[..., rotary_dim:]], dim=-1)
    return x * cos + rotated * sin
