"""GPTQ: quantize a linear layer's weights column by column, feeding each column's rounding
error back into the columns not yet quantized (Frantar, Ashkboos, Hoefler, Alistarh 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
arXiv:2210.17323).

For a linear ``y = x Wᵀ`` and calibration inputs ``X`` the layer-wise objective
``||X Wᵀ - X Ŵᵀ||²`` has Hessian ``H = 2 XᵀX``. With ``U`` the upper Cholesky factor of
``H⁻¹`` (after dampening the diagonal by a small fraction of its mean), quantizing column ``i``
to ``q`` and updating the remaining columns by ``-(w - q) / U[i, i] * U[i, i:]`` is the
optimal-brain-surgeon update; blocks of 128 columns apply it lazily (the paper's Algorithm 1).

Scales are those of the grid in :mod:`.grid` (symmetric, groups along the input dimension,
torchao's ``max|w| / 7.5`` for int4), chosen for each group when the algorithm reaches its
first column, from the error-updated weights as in the reference implementation. With
``act_order`` columns are visited by decreasing Hessian diagonal; the group scales are then
fixed up front from the original weights ("static groups"), so groups stay contiguous in the
original column order, which is the only layout torchao and XNNPACK store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mobile_export.quant_algos.grid import group_scales, qrange, quantize_columns, symmetric_scale

BLOCK = 128  # columns updated lazily together (the paper's B)
FLOAT64_UP_TO = 4096  # Hessians up to this width in float64; wider ones (0.5 GB at 8192) in float32


def _dtype(columns: int) -> torch.dtype:
    return torch.float64 if columns <= FLOAT64_UP_TO else torch.float32


class Hessian:
    """Running ``2 XᵀX / n`` of a linear layer's inputs (rows of any leading shape); float64, or
    float32 beyond :data:`FLOAT64_UP_TO` columns."""

    def __init__(self, columns: int):
        self.matrix = torch.zeros(columns, columns, dtype=_dtype(columns))
        self.samples = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x`` [..., columns]."""
        rows = x.detach().reshape(-1, x.shape[-1]).to(self.matrix.dtype)
        total = self.samples + rows.shape[0]
        self.matrix *= self.samples / total
        self.matrix += rows.t() @ rows * (2.0 / total)
        self.samples = total


@dataclass
class GPTQResult:
    """Integers [out, in] (int8 storage), scales [out, in / group_size], and the proxy loss."""

    qdata: torch.Tensor
    scale: torch.Tensor
    loss: float


def _clip_search(w: torch.Tensor, bits: int, grid: int = 20, max_shrink: float = 0.2) -> torch.Tensor:
    """Per-row clipping of the group maximum that minimises the rounding error (``w`` [rows, g])."""
    best = torch.ones(w.shape[0])
    best_err = torch.full((w.shape[0],), float("inf"))
    for step in range(int(grid * max_shrink) + 1):
        clip = 1.0 - step / grid
        scale = symmetric_scale(w, bits, clip)[:, None]
        err = ((quantize_columns(w, scale, bits) * scale - w) ** 2).sum(dim=1)
        better = err < best_err
        best = torch.where(better, torch.full_like(best, clip), best)
        best_err = torch.where(better, err, best_err)
    return symmetric_scale(w, bits, best)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    bits: int = 4,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    clip_search: bool = False,
    round_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GPTQResult:
    """Quantize ``weight`` [out, in] with GPTQ under ``hessian`` [in, in] (from :class:`Hessian`).

    ``group_size`` equal to ``in`` gives per-channel scales. ``damp`` is the fraction of the mean
    Hessian diagonal added to it. ``clip_search`` additionally shrinks each group's maximum to the
    value that minimises its own rounding error (the reference implementation's ``mse`` option).
    ``round_scale`` maps scales to what the runtime stores (XNNPACK keeps group scales in bf16),
    so the error feedback sees the weights the device computes with.
    """
    keep = round_scale or (lambda scale: scale)
    W = weight.detach().float().clone()
    out, cols = W.shape
    if cols % group_size:
        raise ValueError(f"{cols} columns are not a multiple of group size {group_size}")
    H = hessian.detach().to(_dtype(cols)).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_groups = cols // group_size
    scales = torch.zeros(out, n_groups)
    perm = None
    if act_order:
        static = group_scales(W, group_size, bits)
        if clip_search:
            static = torch.stack(
                [_clip_search(W[:, g * group_size : (g + 1) * group_size], bits) for g in range(n_groups)], 1
            )
        scales = keep(static)
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    H[range(cols), range(cols)] += damp * torch.mean(torch.diag(H))
    U = _inverse_cholesky_upper(H).float()

    Q = torch.zeros_like(W)
    losses = torch.zeros(out)
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        W1 = W[:, start:end].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if perm is None:
                if col % group_size == 0:
                    group = W[:, col : col + group_size].clone()
                    group[:, : min(group_size, end - col)] = W1[:, i : i + group_size]
                    g = col // group_size
                    scales[:, g] = keep(_clip_search(group, bits) if clip_search else symmetric_scale(group, bits))
                scale = scales[:, col // group_size]
            else:
                scale = scales[:, int(perm[col]) // group_size]
            w = W1[:, i]
            d = U1[i, i]
            q = quantize_columns(w, scale, bits)
            Q1[:, i] = q
            err = (w - q * scale) / d
            losses += (w - q * scale) ** 2 / d**2 / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        Q[:, start:end] = Q1
        W[:, end:] -= E1 @ U[start:end, end:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    qmin, qmax = qrange(bits)
    return GPTQResult(qdata=Q.clamp(qmin, qmax).to(torch.int8), scale=scales, loss=float(losses.sum()))


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹``, adding more dampening if ``H`` is not positive definite."""
    extra = 0.0
    mean_diag = float(torch.mean(torch.diag(H)))
    for _ in range(6):
        try:
            L = torch.linalg.cholesky(H + extra * torch.eye(H.shape[0], dtype=H.dtype))
            inverse = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            extra = mean_diag * 0.1 if extra == 0.0 else extra * 10
    raise ValueError("the calibration Hessian is not positive definite even after dampening")
