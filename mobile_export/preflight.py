"""Checks made before any heavy work: a model config's sizes, a folder's ``config.json``, and
whether a build's memory fits this machine. Each failure is one ``UserError`` line that names
the input, instead of a traceback (or gigabytes allocated) later."""

from __future__ import annotations

import json
from pathlib import Path

from mobile_export.errors import UserError

# Above this many bytes of fp32 weights the original model is loaded in bf16 (the reference
# then runs in bf16 too, and verification uses the looser bf16 thresholds); sources loads by it.
FP32_LOAD_LIMIT_BYTES = 6 * 1024**3

# Sizes a decoder config must hold as positive integers when present.
SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
# Of these, null is no size either (the others may be null: derived from the rest).
NON_NULL_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# Above this share of the machine's memory a build is refused before it starts.
MEMORY_SHARE = 0.9


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def model_config_problem(config: dict) -> str | None:
    """The first size in a transformers config dict that no decoder can have (zero, negative or
    non-integer sizes, heads that do not divide the hidden size); None when the sizes are usable.
    Multimodal configs are checked in their ``text_config`` too."""
    for prefix, block in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(block, dict):
            continue
        for key in SIZE_KEYS:
            value = block.get(key)
            if (value is not None or (key in block and key in NON_NULL_KEYS)) and not _positive_int(value):
                return f"{prefix}{key} must be a positive integer, not {value!r}"
        heads, kv_heads = block.get("num_attention_heads"), block.get("num_key_value_heads")
        hidden = block.get("hidden_size")
        if heads and hidden and block.get("head_dim") is None and hidden % heads:
            return f"{prefix}hidden_size {hidden} is not divisible by {prefix}num_attention_heads {heads}"
        if heads and kv_heads and heads % kv_heads:
            return f"{prefix}num_attention_heads {heads} is not divisible by {prefix}num_key_value_heads {kv_heads}"
    return None


def read_config_json(folder: Path) -> dict:
    """A model folder's ``config.json`` as a dict, with its sizes checked."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json", hint="pass a Hugging Face model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path} is not valid JSON", hint="fix or re-download config.json") from exc
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object of config keys", hint="fix or re-download config.json")
    problem = model_config_problem(config)
    if problem:
        raise UserError(f"{path}: {problem}", hint="fix or re-download config.json")
    return config


def estimate_parameters(config: dict) -> int:
    """Rough parameter count of a decoder from its sizes (embeddings, attention, MLP, head)."""
    block = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    hidden = int(block.get("hidden_size") or 0)
    layers = int(block.get("num_hidden_layers") or 0)
    heads = int(block.get("num_attention_heads") or 1)
    kv_heads = int(block.get("num_key_value_heads") or heads)
    head_dim = int(block.get("head_dim") or (hidden // heads if heads else 0))
    inter = int(block.get("intermediate_size") or 4 * hidden)
    vocab = int(block.get("vocab_size") or 0)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    tied = bool(block.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    return vocab * hidden * (1 if tied else 2) + layers * (attention + 3 * hidden * inter)


def check_memory(config: dict, kv_cache_bytes: int | None) -> None:
    """Refuse a build whose weights (fp32, or bf16 where sources loads big models so) and KV
    caches (the eager wrapper's and the exported program's) would not fit in this machine's
    memory, naming the figure."""
    import psutil

    total = psutil.virtual_memory().total
    parameters = estimate_parameters(config)
    weights = parameters * (4 if parameters * 4 <= FP32_LOAD_LIMIT_BYTES else 2)
    needed = weights + 2 * (kv_cache_bytes or 0)
    if needed > MEMORY_SHARE * total:
        kv = f", of which KV caches {2 * (kv_cache_bytes or 0) / 2**30:.3g} GB" if kv_cache_bytes else ""
        raise UserError(
            f"this build needs about {needed / 2**30:.3g} GB of memory{kv}; this machine has {total / 2**30:.3g} GB",
            hint="use a smaller --context-length, or a machine with more memory",
        )


def weight_shape_mismatch(folder: Path, config) -> str | None:
    """The first tensor of a folder's safetensors whose shape differs from what its config
    implies (compared by name against the architecture built on the meta device); None when
    every tensor that both name has the same shape."""
    import torch
    import transformers
    from safetensors import safe_open

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                want = expected.get(name)
                got = list(handle.get_slice(name).get_shape())
                if want is not None and got != want:
                    return f"{path.name}: tensor {name} has shape {got}, but config.json implies {want}"
    return None
