"""Llama and Mistral: the plain pre-norm decoder every other family is described against."""

from __future__ import annotations

from mobile_export.families import ModelFamily

FAMILIES = (
    ModelFamily(
        model_type="llama",
        genai_type="llama",
        # GQA, tied embeddings, llama3 rope scaling
        tiny_config=dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    ModelFamily(
        model_type="mistral",
        genai_type="mistral",
        tiny_config=dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None),
        # transformers applies ``config.sliding_window`` to every Mistral layer through its mask;
        # the wrapper has never done so (no effect while the window covers the whole cache).
        notes="config.sliding_window is not applied",
    ),
)
