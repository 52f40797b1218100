"""Fused projections split (or joined) exactly, by output rows."""

from __future__ import annotations

import torch
from torch import nn


def split_linear(linear: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    """Split a fused projection into separate linears by output rows (exact)."""
    parts = []
    offset = 0
    for size in sizes:
        part = nn.Linear(linear.in_features, size, bias=linear.bias is not None, device="meta")
        part.weight = nn.Parameter(linear.weight.detach()[offset : offset + size], requires_grad=False)
        if linear.bias is not None:
            part.bias = nn.Parameter(linear.bias.detach()[offset : offset + size], requires_grad=False)
        parts.append(part)
        offset += size
    return parts


def concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One linear computing several side by side (outputs concatenated; exact)."""
    has_bias = any(lin.bias is not None for lin in linears)
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        biases = [
            lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features, dtype=weight.dtype)
            for lin in linears
        ]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with separate gate/up projections (splits fused gate_up)."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate, up, down, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def split_gate_up(mlp: nn.Module) -> GatedMLP:
    """Phi-3's MLP (one ``gate_up_proj``, ``activation_fn``) as a :class:`GatedMLP`."""
    fused = mlp.gate_up_proj
    half = fused.out_features // 2
    gate, up = split_linear(fused, [half, half])
    return GatedMLP(gate, up, mlp.down_proj, mlp.activation_fn)
