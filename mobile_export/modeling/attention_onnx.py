"""Attention for ONNX Runtime: past/present KV tensors and one ``GroupQueryAttention`` call
(:mod:`mobile_export.ort_attention`), ONNX Runtime GenAI's convention (see
:class:`~mobile_export.modeling.entries.OnnxEntry`)."""

from __future__ import annotations

import torch
from torch import nn

from mobile_export.modeling.attention import AttentionSpec, DecoderAttention, StepContext
from mobile_export.modeling.projections import concat_linears, split_linear
from mobile_export.modeling.rope import apply_rope_sliced


class OnnxAttention(DecoderAttention):
    """Attention for ONNX Runtime: past/present KV tensors and one ``GroupQueryAttention`` call.

    The layer reads its past keys/values from the step context and leaves its presents there;
    rotary embedding runs inside the op from half-width cos/sin tables (the decoder passes them)
    when ``rotary_in_op``, else before it in plain ops.
    """

    def __init__(
        self,
        hf_attn: nn.Module,
        spec: AttentionSpec,
        max_seq_len: int,
        ctx: StepContext,
        index: int,
        rotary_in_op: bool,
    ):
        super().__init__(hf_attn, spec, max_seq_len, ctx)
        self.index = index
        self.k_cache = self.v_cache = None  # the cache lives outside the model
        self.qkv_proj = None
        self.rotary_in_op = rotary_in_op  # whether GroupQueryAttention applies rotary itself
        if self.q_norm is None and self.k_norm is None:  # one matmul for q, k and v (GQA's packed input)
            self.qkv_proj = concat_linears([self.q_proj, self.k_proj, self.v_proj])
            self.q_proj = self.k_proj = self.v_proj = None

    def split_qkv(self) -> None:
        """Separate q, k and v matmuls again (exact), so each can be quantized on its own grid."""
        if self.qkv_proj is None:
            return
        kv = self.n_kv_heads * self.head_dim
        sizes = [self.n_heads * self.head_dim, kv, kv]
        self.q_proj, self.k_proj, self.v_proj = split_linear(self.qkv_proj, sizes)
        self.qkv_proj = None

    def _rotate_outside(self, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding before the attention op (rotary widths ONNX Runtime's op cannot take)."""
        q = q.reshape(1, -1, self.n_heads, self.head_dim)
        k = k.reshape(1, -1, self.n_kv_heads, self.head_dim)
        q = apply_rope_sliced(q, cos, sin, self.rotary_dim).reshape(1, -1, self.n_heads * self.head_dim)
        k = apply_rope_sliced(k, cos, sin, self.rotary_dim).reshape(1, -1, self.n_kv_heads * self.head_dim)
        return q, k

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, **_) -> tuple:
        from mobile_export import ort_attention  # noqa: F401  (registers the op)

        if self.qkv_proj is not None and self.rotary_in_op:
            q, k, v = self.qkv_proj(hidden_states), None, None
        elif self.qkv_proj is not None:
            sizes = [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]
            q, k, v = self.qkv_proj(hidden_states).split(sizes, dim=-1)
        elif self.q_norm is None and self.k_norm is None:  # split for their own quantization
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        else:
            q, k, v = self._project(hidden_states)
            q = q.reshape(1, -1, self.n_heads * self.head_dim)
            k = k.reshape(1, -1, self.n_kv_heads * self.head_dim)
            v = v.reshape(1, -1, self.n_kv_heads * self.head_dim)
        cos, sin, _ = position_embeddings
        if not self.rotary_in_op:  # rotary embedding in plain ops; cos/sin are full-width [T, 1, D] rows
            q, k = self._rotate_outside(q, k, cos, sin)
            cos = sin = None
        past_key, past_value = self.ctx.past[self.index]
        out, present_key, present_value = torch.ops.mobile_export.group_query_attention(
            q,
            k,
            v,
            past_key,
            past_value,
            self.ctx.attention_mask,
            cos,
            sin,
            self.n_heads,
            self.n_kv_heads,
            self.scaling,
            float(self.softcap or 0.0),
            int(self.sliding_window or 0),
        )
        self.ctx.presents[self.index] = (present_key, present_value)
        return self.o_proj(out), None
