"""Phi-3: fused qkv and gate_up projections, partial rotary, longrope."""

from __future__ import annotations

from mobile_export.families import ModelFamily

FAMILIES = (
    ModelFamily(
        model_type="phi3",
        genai_type="phi3",
        tiny_config=dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            partial_rotary_factor=0.5,
            original_max_position_embeddings=128,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.1, 1.2, 1.3],
                "long_factor": [2.0, 2.1, 2.2, 2.3],
            },
            pad_token_id=0,
        ),
        fused_qkv=True,
        fused_gate_up=True,
        # transformers passes ``config.sliding_window`` to Phi-3's attention; the wrapper has never
        # applied it (no effect while the window covers the whole cache).
        notes="config.sliding_window is not applied",
    ),
)
