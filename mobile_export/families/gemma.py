"""Gemma 1/2/3: ``(1 + w)`` RMSNorms and embeddings scaled by sqrt(hidden_size); Gemma 2 adds
soft-capping, sandwich norms and sliding windows; Gemma 3 local/global layers with their own rope."""

from __future__ import annotations

from mobile_export.families import ModelFamily, Window

FAMILIES = (
    ModelFamily(
        model_type="gemma",
        genai_type="gemma",
        # (1 + w) RMSNorm, scaled embeddings, gelu-tanh MLP
        tiny_config=dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
        norm_offset=1.0,
        scaled_embeddings=True,
    ),
    ModelFamily(
        model_type="gemma2",
        genai_type="gemma2",
        # attention and final logit soft-capping, sliding window, sandwich norms
        tiny_config=dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=16,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
        norm_offset=1.0,
        scaled_embeddings=True,
        sandwich_norms=True,
        attention_softcap=True,
        final_softcap=True,
        sliding_window=Window.LAYER_TYPES,
    ),
    ModelFamily(
        model_type="gemma3_text",
        genai_type="gemma3_text",
        # local/global layers with their own rope, q/k norm, window < context
        tiny_config=dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=16,
            sliding_window_pattern=2,
            query_pre_attn_scalar=16,
            rope_local_base_freq=10000.0,
        ),
        norm_offset=1.0,
        scaled_embeddings=True,
        qk_norm=True,
        sandwich_norms=True,
        rope_by_layer_type=True,
        attention_softcap=True,
        final_softcap=True,
        sliding_window=Window.LAYER_TYPES,
    ),
)
