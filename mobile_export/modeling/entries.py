"""Calling conventions over an :class:`~mobile_export.modeling.decoder.ExportableDecoder`: Core ML's
and ONNX Runtime GenAI's entry modules, and the example inputs / dynamic shapes of ExecuTorch's."""

from __future__ import annotations

import math

import torch
from torch import nn

from mobile_export.modeling.attention_kinds import OnnxAttentionKind, PortableAttentionKind
from mobile_export.modeling.decoder import ExportableDecoder


class CoreMLEntry(nn.Module):
    """Core ML calling convention over a portable-attention decoder.

    ``forward(input_ids: int32[1, T], causal_mask: fp16[1, 1, T, end]) -> logits[1, vocab]``:
    the T tokens sit at positions ``end - T .. end - 1``, so the cache positions come from the
    two inputs' shapes (both flexible), and the caller's mask decides what each query sees.
    """

    def __init__(self, decoder: ExportableDecoder):
        super().__init__()
        if not isinstance(decoder.kind, PortableAttentionKind):
            raise ValueError("Core ML needs a decoder built with attention='portable'")
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        end = causal_mask.shape[-1]
        return self.decoder.run(input_ids, end - seq, end, causal_mask)


class OnnxEntry(nn.Module):
    """ONNX Runtime GenAI's calling convention over an onnx-attention decoder.

    ``forward(input_ids: int64[1, S], attention_mask: int64[1, T], past_key_0, past_value_0, ...)
    -> (logits[1, S, vocab], present_key_0, present_value_0, ...)`` with caches [1, Hkv, P, D]
    and T = P + S.
    """

    def __init__(self, decoder: ExportableDecoder):
        super().__init__()
        if not isinstance(decoder.kind, OnnxAttentionKind):
            raise ValueError("ONNX export needs a decoder built with attention='onnx'")
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple:
        ctx = self.decoder.ctx
        n_layers = len(self.decoder.layers)
        ctx.past = [(past[2 * i], past[2 * i + 1]) for i in range(n_layers)]
        ctx.presents = [None] * n_layers
        ctx.attention_mask = attention_mask
        logits = self.decoder.run(input_ids, 0, input_ids.shape[1], all_positions=True)
        presents = [t for pair in ctx.presents for t in pair]
        ctx.past = ctx.presents = ctx.attention_mask = None
        return (logits, *presents)


def example_inputs(max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs used to trace: a short prompt at position 0 (length > 1 keeps T dynamic)."""
    seq = min(max(2, math.ceil(max_seq_len / 8)), max_seq_len - 1, 16)
    return torch.zeros((1, seq), dtype=torch.long), torch.tensor([0], dtype=torch.long)


def dynamic_shapes(max_seq_len: int) -> tuple:
    """Dynamic token dimension for export: 1..max_seq_len tokens per call."""
    seq = torch.export.Dim("seq_len", min=1, max=max_seq_len)
    return ({1: seq}, None)
