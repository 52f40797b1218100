"""Train the small byte-level BPE demo tokenizer shipped with mobile-export.

The tokenizer is trained on ``mobile_export/assets/text/fixed_eval.txt`` (original
text written for this project) and written to ``mobile_export/assets/demo/`` as:

* ``tokenizer.json`` -- the ``tokenizers`` serialization (model, pre-tokenizer,
  decoder and a post-processor that prepends ``<|bos|>``),
* ``tokenizer_config.json`` -- so ``transformers.AutoTokenizer.from_pretrained``
  loads it as a ``PreTrainedTokenizerFast``,
* ``special_tokens_map.json``.

Training is deterministic: the same input text always yields byte-identical
output files. Run from anywhere with::

    python tools/make_demo_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = REPO_ROOT / "mobile_export" / "assets" / "text" / "fixed_eval.txt"
DEFAULT_OUT = REPO_ROOT / "mobile_export" / "assets" / "demo"

VOCAB_SIZE = 1024
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS: list[str] = [BOS, EOS, PAD]  # order fixes the ids: 0, 1, 2
MODEL_MAX_LENGTH = 2048


def read_training_text(path: Path) -> list[str]:
    """Read the training text as a single-item corpus.

    The whole file is one item, so the blank lines between paragraphs and the
    code indentation are seen in training exactly as they appear at eval time.

    Args:
        path: UTF-8 text file.

    Returns:
        A one-element list holding the file's text.
    """
    return [path.read_text(encoding="utf-8")]


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE tokenizer with special tokens at ids 0, 1 and 2.

    The special tokens are ``<|bos|>`` (0), ``<|eos|>`` (1) and ``<|pad|>`` (2).

    Args:
        texts: Training corpus items.
        vocab_size: Total vocabulary size, special tokens included.

    Returns:
        The trained tokenizer, with a post-processor prepending ``<|bos|>``.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int = VOCAB_SIZE) -> None:
    """Raise ``RuntimeError`` if ids of special tokens or the vocab size are off."""
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual = tokenizer.token_to_id(token)
        if actual != expected_id:
            raise RuntimeError(f"{token} has id {actual}, expected {expected_id}")
    actual_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual_size != vocab_size:
        raise RuntimeError(f"vocab size is {actual_size}, expected {vocab_size}")


def tokenizer_config() -> dict[str, Any]:
    """Return ``tokenizer_config.json`` contents for ``PreTrainedTokenizerFast``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": MODEL_MAX_LENGTH,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }


def special_tokens_map() -> dict[str, str]:
    """Return ``special_tokens_map.json`` contents."""
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as stable, human-readable JSON."""
    path.write_text(
        json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def main(argv: list[str] | None = None) -> int:
    """Train the demo tokenizer and write its files; return a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="training text")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory"
    )
    args = parser.parse_args(argv)

    tokenizer = train_tokenizer(read_training_text(args.text))
    check_tokenizer(tokenizer)

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"), pretty=True)
    write_json(args.out / "tokenizer_config.json", tokenizer_config())
    write_json(args.out / "special_tokens_map.json", special_tokens_map())

    n_tokens = len(tokenizer.encode(args.text.read_text(encoding="utf-8")).ids)
    vocab = tokenizer.get_vocab_size()
    print(f"wrote {args.out}: vocab {vocab}, {n_tokens} tokens in {args.text.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
