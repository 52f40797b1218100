"""Rotary-embedding tables for the export wrapper, built with transformers' own rotary modules.

:func:`rope_tables` gives every layer type's cos/sin rows for all positions; where the rope is
static, :func:`rope_frequencies` gives the frequencies that rebuild those rows in the graph, so
the ExecuTorch program need not store the tables.
"""

from __future__ import annotations

import torch


def rope_tables(
    rotary_cls: type, config, max_seq_len: int, head_dim: int, by_layer_type: bool = False
) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
    """cos/sin tables [max_seq_len, 1, head_dim] per layer type, from transformers' own rotary module.

    A fresh fp32 rotary module is built from the config, so every rope variant transformers
    knows (llama3, linear, yarn, longrope, per-layer-type Gemma 3 ropes) comes out exactly as the
    original model computes it. Dims past the rotary width get cos 1 and sin 0. With
    ``by_layer_type`` (the family's record says so: Gemma 3) each ``config.layer_types`` entry
    gets its own table, else the model has one (keyed None).
    """
    with torch.device("cpu"):
        rotary = rotary_cls(config).float()
    positions = torch.arange(max_seq_len, dtype=torch.long)[None, :]
    probe = torch.zeros(1, dtype=torch.float32)

    def padded(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos[0].float(), sin[0].float()
        extra = head_dim - cos.shape[-1]
        if extra:
            cos = torch.cat([cos, torch.ones(max_seq_len, extra)], dim=-1)
            sin = torch.cat([sin, torch.zeros(max_seq_len, extra)], dim=-1)
        return cos[:, None, :].contiguous(), sin[:, None, :].contiguous()

    tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        if by_layer_type:
            for layer_type in sorted(set(config.layer_types)):
                tables[layer_type] = padded(*rotary(probe, positions, layer_type))
        else:
            tables[None] = padded(*rotary(probe, positions))
    return tables


def rope_frequencies(
    rotary_cls: type, config, tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str | None, tuple[torch.Tensor, float]]:
    """Per layer type, the inverse frequencies and output scale that rebuild its cos/sin table as
    ``cos(p * f) * s`` for every position ``p`` (full-width rotary, non-interleaved halves).

    Only static rope variants qualify, and only when the rebuilt table matches transformers' own
    within fp32 rounding (checked here for every position): dynamic or long-context variants whose
    frequencies depend on the sequence keep their tables. Computing the rows in the graph saves the
    tables' bytes (2 x positions x head_dim fp32 per layer type: 1 MB at 2048 x 64).
    """
    with torch.device("cpu"):
        rotary = rotary_cls(config).float()
    found: dict[str | None, tuple[torch.Tensor, float]] = {}
    for layer_type, (cos, sin) in tables.items():
        prefix = f"{layer_type}_" if layer_type is not None else ""
        inv_freq = getattr(rotary, f"{prefix}inv_freq", None)
        scaling = getattr(rotary, f"{prefix}attention_scaling", None)
        if not isinstance(inv_freq, torch.Tensor) or not isinstance(scaling, (int, float)):
            continue
        if 2 * inv_freq.numel() != cos.shape[-1]:
            continue
        positions = torch.arange(cos.shape[0], dtype=torch.float32)[:, None]
        freqs = torch.cat([positions * inv_freq.float()] * 2, dim=-1)
        rebuilt_cos, rebuilt_sin = freqs.cos() * scaling, freqs.sin() * scaling
        if torch.allclose(rebuilt_cos, cos[:, 0], atol=1e-5, rtol=0) and torch.allclose(
            rebuilt_sin, sin[:, 0], atol=1e-5, rtol=0
        ):
            found[layer_type] = (inv_freq.float().clone(), float(scaling))
    return found


def rotary_dim_of(table: torch.Tensor) -> int:
    """Width of the rotated part of a padded sin table (trailing all-zero columns are not rotated)."""
    nonzero = table.reshape(-1, table.shape[-1]).abs().amax(dim=0) > 0
    return int(nonzero.nonzero().max()) + 1 if nonzero.any() else table.shape[-1]
