"""Attention in plain ops over a cache written by slice assignment: the form Core ML converts
into stateful ``slice_update`` programs (see :class:`~mobile_export.modeling.entries.CoreMLEntry`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mobile_export.modeling.attention import AttentionSpec, DecoderAttention, StepContext, additive_causal_mask
from mobile_export.modeling.rope import apply_rope_sliced


class PortableAttention(DecoderAttention):
    """Attention over a static cache laid out [1, n_kv_heads, max_seq_len, head_dim], in plain ops.

    Keys/values are written with slice assignment at ``start:end`` and attention reads the
    first ``end`` cache rows, with an additive mask (given, or causal). Start and end may be
    traced sizes, so converters see shape arithmetic rather than data-dependent indexing.
    The cache has the model's dtype (fp16 for Core ML, whose states are fp16).
    """

    def __init__(self, hf_attn: nn.Module, spec: AttentionSpec, max_seq_len: int, ctx: StepContext, dtype: torch.dtype):
        super().__init__(hf_attn, spec, max_seq_len, ctx)
        shape = (1, self.n_kv_heads, max_seq_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def _expand_kv(self, cache: torch.Tensor, end) -> torch.Tensor:
        groups = self.n_heads // self.n_kv_heads
        kv = cache[:, :, :end]
        if groups == 1:
            return kv
        kv = kv[:, :, None].expand(1, self.n_kv_heads, groups, kv.shape[2], self.head_dim)
        return kv.reshape(1, self.n_heads, -1, self.head_dim)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, **_) -> tuple:
        seq = hidden_states.shape[1]
        q, k, v = self._project(hidden_states)
        cos, sin, _ = position_embeddings
        q, k = apply_rope_sliced(q, cos, sin, self.rotary_dim), apply_rope_sliced(k, cos, sin, self.rotary_dim)
        start, end = self.ctx.start_pos, self.ctx.end_pos
        self.k_cache[:, :, start:end] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[:, :, start:end] = v.transpose(1, 2).to(self.v_cache.dtype)
        q = q.transpose(1, 2)
        # The explicit casts keep converter dtypes aligned (Core ML reads fp16 states).
        keys = self._expand_kv(self.k_cache, end).to(q.dtype)
        values = self._expand_kv(self.v_cache, end).to(q.dtype)
        mask = self.ctx.mask if self.ctx.mask is not None else additive_causal_mask(start, seq, end, q.dtype)
        mask = self.masking.restrict(mask.to(q.dtype), start, seq, end)
        if self.softcap is not None:
            scores = torch.matmul(q, keys.transpose(2, 3)) * self.scaling
            scores = torch.tanh(scores / self.softcap) * self.softcap + mask
            out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), values)
        else:
            # SDPA's default scale is 1/sqrt(head_dim); other scalings (Gemma) go into q, since
            # Core ML's converter cannot take an explicit scale with fp16 inputs.
            correction = self.scaling * math.sqrt(self.head_dim)
            if abs(correction - 1.0) > 1e-6:
                q = q * correction
            out = nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.transpose(1, 2).reshape(1, seq, self.n_heads * self.head_dim)
        return self.o_proj(out), None
