"""RMSNorm in a form XNNPACK takes whole, swapped in for transformers' RMSNorms before export."""

from __future__ import annotations

import torch
from torch import nn


class ExportRMSNorm(nn.Module):
    """RMSNorm written so XNNPACK takes it whole: the mean runs over a 4-D view's inner dims.

    Works on [..., D] inputs of any rank (hidden states [1, T, D], per-head q/k [1, T, H, D]).
    ``weight`` already holds the effective scale (Gemma's ``1 + w`` is folded in).
    """

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        dim = shape[-1]
        flat = x.float().view(1, -1, 1, dim)
        var = flat.pow(2).mean(dim=(2, 3), keepdim=True)
        out = ((flat * torch.rsqrt(var + self.eps)) * self.weight).to(x.dtype)
        if len(shape) == 4:
            return out.view(1, -1, shape[2], dim)
        if len(shape) == 3:
            return out.view(1, -1, dim)
        return out.view(-1, dim)


def export_norm_of(module: nn.Module, offset: float) -> ExportRMSNorm | None:
    """The :class:`ExportRMSNorm` of a transformers RMSNorm whose scale is ``offset + weight``.

    The family record says the form (Gemma: ``(1 + w) * x``); it is checked against the
    module's own output. Returns None when it does not match (the module is then kept as it is).
    """
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if weight is None or eps is None or weight.dim() != 1 or weight.is_meta:
        return None
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, weight.shape[0], generator=gen)
    with torch.no_grad():
        expected = module.float()(probe)
        effective = weight.float() if offset == 0.0 else offset + weight.float()
        candidate = ExportRMSNorm(effective, float(eps))
        if torch.allclose(candidate(probe).view_as(expected), expected, atol=1e-5, rtol=1e-5):
            return candidate
    return None


def replace_norms(root: nn.Module, offset: float) -> int:
    """Swap every RMSNorm under ``root`` for :class:`ExportRMSNorm`; returns how many."""
    replaced = 0
    for name, child in list(root.named_children()):
        if type(child).__name__.endswith("RMSNorm"):
            new = export_norm_of(child, offset)
            if new is not None:
                setattr(root, name, new)
                replaced += 1
                continue
        replaced += replace_norms(child, offset)
    return replaced
