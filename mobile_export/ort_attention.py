"""ONNX Runtime's ``GroupQueryAttention`` as a PyTorch custom op, so the ONNX export emits it directly.

ONNX Runtime's CPU speed on decoders comes from its fused contrib ops. Attention is the one
that pattern rewriting finds least reliably on a traced graph (it must recognise the mask, the
cache concatenation and the head expansion of each model family), so the export wrapper calls
``torch.ops.mobile_export.group_query_attention`` instead: in PyTorch it runs the attention
below (used for tracing and for eager checks), and ``torch.onnx.export`` translates it into one
``com.microsoft.GroupQueryAttention`` node with rotary embedding inside (``do_rotary=1``), the
form ONNX Runtime GenAI's own model builder writes.

Semantics (those of the contrib op, with its KV cache in "BNSH" layout):

- ``query`` [B, S, H*D], ``key``/``value`` [B, S, Hkv*D] for the S new tokens; or ``query``
  packed as [B, S, (H + 2*Hkv)*D] with ``key``/``value`` None (one projection matmul);
- ``past_key``/``past_value`` [B, Hkv, P, D]; ``present_*`` = past + new, [B, Hkv, P+S, D]
  (ONNX Runtime also accepts a preallocated buffer shared between past and present, which
  ONNX Runtime GenAI uses with ``past_present_share_buffer``);
- ``attention_mask`` [B, T] of ones: T is the total length, so the new tokens sit at positions
  ``T-S .. T-1`` and rotary embedding uses those positions;
- ``cos``/``sin`` [max_positions, rotary_dim/2]: the rotary tables (half-split convention; head
  dims past ``rotary_dim`` are not rotated); None when the caller applied rotary embedding
  itself (ONNX Runtime needs ``rotary_dim/2`` to be a multiple of 8);
- ``scale`` multiplies q·k, ``softcap`` > 0 applies ``tanh(x/softcap)*softcap`` to the scores,
  ``window`` > 0 lets a query see only the ``window`` most recent keys (itself included).
"""

from __future__ import annotations

import torch

OP_NAME = "mobile_export::group_query_attention"
ORT_DOMAIN = "com.microsoft"


@torch.library.custom_op(OP_NAME, mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    attention_mask: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    kv_heads: int,
    scale: float,
    softcap: float,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference attention with the contrib op's semantics (see the module docstring)."""
    batch, seq, _ = query.shape
    head_dim = past_key.shape[-1]
    if key is None or value is None:
        query, key, value = query.split([num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    total = attention_mask.shape[1]
    positions = torch.arange(total - seq, total)

    def rope(x: torch.Tensor) -> torch.Tensor:
        if cos is None or sin is None:
            return x
        half = cos.shape[-1]
        cos_t = torch.cat([cos[positions], cos[positions]], dim=-1)[None, None].to(x.dtype)
        sin_t = torch.cat([sin[positions], sin[positions]], dim=-1)[None, None].to(x.dtype)
        rotated, passed = x[..., : 2 * half], x[..., 2 * half :]
        turned = torch.cat([-rotated[..., half:], rotated[..., :half]], dim=-1)
        return torch.cat([rotated * cos_t + turned * sin_t, passed], dim=-1)

    q = rope(query.view(batch, seq, num_heads, head_dim).transpose(1, 2))
    k = rope(key.view(batch, seq, kv_heads, head_dim).transpose(1, 2))
    v = value.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    present_key = torch.cat([past_key, k.to(past_key.dtype)], dim=2)
    present_value = torch.cat([past_value, v.to(past_value.dtype)], dim=2)
    groups = num_heads // kv_heads
    keys = present_key.repeat_interleave(groups, dim=1).to(q.dtype)
    values = present_value.repeat_interleave(groups, dim=1).to(q.dtype)
    scores = torch.matmul(q, keys.transpose(2, 3)).float() * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    n_keys = keys.shape[2]
    q_pos = torch.arange(n_keys - seq, n_keys)[:, None]
    k_pos = torch.arange(n_keys)[None, :]
    masked = k_pos > q_pos
    if window > 0:
        masked = masked | (q_pos - k_pos >= window)
    scores = scores.masked_fill(masked, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), values)
    return out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, cos, sin, num_heads, kv_heads, scale, softcap, window):
    batch, seq, _ = query.shape
    present = past_key.new_empty(batch, kv_heads, past_key.shape[2] + seq, past_key.shape[3])
    return query.new_empty(batch, seq, num_heads * past_key.shape[3]), present, present.clone()


_SCHEMA_REGISTERED = False


def _register_onnx_schema() -> None:
    """Make the contrib op known to ``onnx.defs`` (the exporter's graph builder looks schemas up there)."""
    global _SCHEMA_REGISTERED
    if _SCHEMA_REGISTERED:
        return
    import onnx
    from onnx.defs import OpSchema

    if not onnx.defs.has("GroupQueryAttention", ORT_DOMAIN):
        param = OpSchema.FormalParameter
        optional = OpSchema.FormalParameterOption.Optional
        inputs = [param("query", "T")]
        inputs += [param(n, "T", param_option=optional) for n in ("key", "value", "past_key", "past_value")]
        inputs += [param("seqlens_k", "M"), param("total_sequence_length", "M")]
        inputs += [param(n, "T", param_option=optional) for n in ("cos_cache", "sin_cache")]
        attr = OpSchema.Attribute
        ints, floats = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
        onnx.defs.register_schema(
            OpSchema(
                "GroupQueryAttention",
                ORT_DOMAIN,
                1,
                inputs=inputs,
                outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
                type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
                attributes=[
                    attr("num_heads", ints, ""),
                    attr("kv_num_heads", ints, ""),
                    attr("scale", floats, ""),
                    attr("softcap", floats, ""),
                    attr("local_window_size", ints, ""),
                    attr("do_rotary", ints, ""),
                    attr("rotary_interleaved", ints, ""),
                ],
            )
        )
    _SCHEMA_REGISTERED = True


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: our op → one GroupQueryAttention node.

    ``seqlens_k`` (total length - 1 per sequence) and ``total_sequence_length`` are computed in
    the graph from ``attention_mask``, as ONNX Runtime GenAI feeds it.
    """
    import onnxscript
    from onnxscript import opset18 as op

    _register_onnx_schema()
    ort = onnxscript.values.Opset(ORT_DOMAIN, 1)
    int32 = 6  # onnx.TensorProto.INT32

    def translate(query, key, value, past_key, past_value, attention_mask, cos, sin, num_heads: int, kv_heads: int,
                  scale: float, softcap: float, window: int):  # fmt: skip
        ones = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)
        seqlens_k = op.Cast(op.Sub(ones, op.Constant(value_int=1)), to=int32)
        total = op.Cast(op.Gather(op.Shape(attention_mask), op.Constant(value_int=1), axis=0), to=int32)
        return ort.GroupQueryAttention(
            query, key, value, past_key, past_value, seqlens_k, total, cos, sin,
            num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, softcap=softcap,
            local_window_size=window if window > 0 else -1, do_rotary=int(cos is not None), rotary_interleaved=0,
        )  # fmt: skip

    return {torch.ops.mobile_export.group_query_attention.default: translate}


def rotary_fits(rotary_dim: int, head_dim: int) -> bool:
    """Whether ONNX Runtime's GroupQueryAttention can apply this rotary embedding itself."""
    half = rotary_dim // 2
    return half % 8 == 0 and half <= head_dim // 2
