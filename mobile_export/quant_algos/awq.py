"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", arXiv:2306.00978).

Input channels that carry large activations matter most. For the linears that read one input
``X`` (q/k/v after the attention norm, gate/up after the MLP norm, down after up), AWQ scales
input channel ``j`` of their weights by ``s_j = mean|X_j|^α`` and divides the input by ``s``,
folding ``1 / s`` into whatever produces ``X`` (the norm's weight, or the rows of the previous
linear), so the full-precision model is unchanged while the important channels get a finer
grid. ``α`` is searched on a grid of 20 values, minimising the error of the stage's quantized
outputs on the calibration activations. Then each group's clipping of its maximum is searched
(the paper's weight clipping, not for q/k whose errors pass through the softmax), and the
weights are rounded to the nearest grid point with those scales.

This implementation measures each stage's error at the outputs of its linears (the reference
implementation measures it after the whole attention or MLP block).
"""

from __future__ import annotations

import torch

from mobile_export.quant_algos.grid import fake_quantize, group_view, quantize_columns, symmetric_scale

GRID = 20
MAX_SEARCH_TOKENS = 4096
MAX_CLIP_TOKENS = 512
CLIP_MAX_SHRINK = 0.5


def _subsample(x: torch.Tensor, limit: int) -> torch.Tensor:
    if x.shape[0] <= limit:
        return x
    step = x.shape[0] / limit
    return x[(torch.arange(limit) * step).long()]


def search_scales(x: torch.Tensor, weights: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, float]:
    """Per-input-channel scales ``s`` [in] for linears reading ``x`` [tokens, in].

    ``weights`` holds (weight [out, in], group size, bits) per linear. Returns ``s`` and the chosen
    ``α`` (0 means no scaling helped).
    """
    x = _subsample(x.float(), MAX_SEARCH_TOKENS)
    x_mean = x.abs().mean(dim=0).clamp(min=1e-8)
    with torch.no_grad():
        refs = [x @ w.float().t() for w, _, _ in weights]
        best_err, best_alpha, best = float("inf"), 0.0, torch.ones_like(x_mean)
        for step in range(GRID):
            alpha = step / GRID
            s = x_mean.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()
            err = 0.0
            for (w, group, bits), ref in zip(weights, refs, strict=True):
                wq = fake_quantize(w.float() * s[None, :], group, bits) / s[None, :]
                err += float(((x @ wq.t() - ref) ** 2).mean())
            if err < best_err:
                best_err, best_alpha, best = err, alpha, s
    return best, best_alpha


def search_clip(x: torch.Tensor, w: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Per-group scales [out, in / group_size] whose clipped maxima minimise each group's output error."""
    x = _subsample(x.float(), MAX_CLIP_TOKENS)
    w = w.float()
    groups = group_view(w, group_size)  # [out, G, g]
    xg = x.reshape(x.shape[0], -1, group_size)  # [n, G, g]
    best_err = torch.full(groups.shape[:2], float("inf"))
    best_scale = symmetric_scale(groups, bits)
    with torch.no_grad():
        for step in range(int(GRID * CLIP_MAX_SHRINK)):
            clip = 1.0 - step / GRID
            scale = symmetric_scale(groups, bits, clip)
            delta = quantize_columns(groups, scale[..., None], bits) * scale[..., None] - groups  # [out, G, g]
            err = torch.einsum("ngk,ogk->nog", xg, delta).pow(2).mean(dim=0)  # [out, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale
