"""``genai_config.json``: what ONNX Runtime GenAI reads to load and drive the model folder.

Same keys as ONNX Runtime GenAI's own model builder writes: the decoder's file, head counts and
sizes, the input/output names with the KV-cache name patterns, special token ids, the context
length and greedy search defaults. ``past_present_share_buffer`` is on: GroupQueryAttention
updates one preallocated cache of ``context_length`` in place, so decode never copies the cache.
"""

from __future__ import annotations

from mobile_export.backends.onnx_graph import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE
from mobile_export.errors import UserError
from mobile_export.families import all_families, get_family

# transformers model_type → ONNX Runtime GenAI model type, from the family records
# (mobile_export.families); a family without one is absent.
GENAI_TYPES: dict[str, str] = {f.model_type: f.genai_type for f in all_families() if f.genai_type is not None}


def genai_type(model_type: str) -> str:
    """ONNX Runtime GenAI's model type for ``model_type``; a UserError when it has none."""
    family = get_family(model_type)
    if family.genai_type is None:
        raise UserError(
            f"ONNX Runtime GenAI has no model type for '{model_type}', so genai_config.json cannot be written",
            hint="build for another backend, or give the family a genai_type in mobile_export/families/",
        )
    return family.genai_type


def genai_config(
    model_type: str,
    *,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    hidden_size: int,
    vocab_size: int,
    context_length: int,
    bos_id: int | None,
    eos_ids: list[int],
    pad_id: int | None,
) -> dict:
    """The config dict for a decoder exported by :mod:`mobile_export.backends.onnx_graph`."""
    model: dict = {
        "type": genai_type(model_type),
        "context_length": context_length,
        "vocab_size": vocab_size,
        "eos_token_id": eos_ids if len(eos_ids) != 1 else eos_ids[0],
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": "model.onnx",
            "head_size": head_dim,
            "hidden_size": hidden_size,
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv_heads,
            "num_hidden_layers": n_layers,
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "past_key_names": PAST_KEY,
                "past_value_names": PAST_VALUE,
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": PRESENT_KEY,
                "present_value_names": PRESENT_VALUE,
            },
        },
    }
    if bos_id is not None:
        model["bos_token_id"] = bos_id
    if pad_id is not None:
        model["pad_token_id"] = pad_id
    elif eos_ids:
        model["pad_token_id"] = eos_ids[0]
    search = {
        "do_sample": False,
        "num_beams": 1,
        "num_return_sequences": 1,
        "max_length": context_length,
        "min_length": 0,
        "past_present_share_buffer": True,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
        "early_stopping": True,
        "length_penalty": 1.0,
        "diversity_penalty": 0.0,
        "no_repeat_ngram_size": 0,
    }
    return {"model": model, "search": search}
