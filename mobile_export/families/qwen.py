"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm)."""

from __future__ import annotations

from mobile_export.families import ModelFamily, Window

FAMILIES = (
    ModelFamily(
        model_type="qwen2",
        genai_type="qwen2",
        # q/k/v bias, untied head
        tiny_config=dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        sliding_window=Window.LAYER_TYPES,
    ),
    ModelFamily(
        model_type="qwen3",
        genai_type="qwen3",
        # per-head q/k RMSNorm, explicit head_dim
        tiny_config=dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
        qk_norm=True,
        sliding_window=Window.LAYER_TYPES,
    ),
)
