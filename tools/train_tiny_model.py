"""Train the small Llama-architecture model that fidelity tests and benchmarks run on.

Quantization error can only be measured on a model that has learned something: random weights
give flat next-token distributions that any noise reshuffles. This script trains a 4-layer
Llama (GQA: 4 query heads, 2 key/value heads, tied embeddings) with the project's demo tokenizer
(1024 tokens) on text every machine with Python has: the standard library's own ``.py`` files.

Deterministic: fixed seed, files chosen by a hash of their path up to a fixed byte budget, a
fixed number of steps, one thread count. Held out of training: ``HELDOUT_FILES`` (the eval
text of tests and benchmarks, see :func:`heldout_text`) and the project's
``mobile_export/assets/text/fixed_eval.txt`` (not a ``.py`` file). About 1–2 minutes on 2 cores.

    python tools/train_tiny_model.py --out DIR

writes a Hugging Face folder: ``config.json``, ``model.safetensors``, ``generation_config.json``,
the demo tokenizer's files and ``training.json`` (what was trained on, losses, held-out
perplexity of the trained model and of its random initialisation).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER_DIR = REPO_ROOT / "mobile_export" / "assets" / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

SEED = 0
BYTE_BUDGET = 1_600_000  # of source text (~0.7M tokens with the demo tokenizer)
SEQ_LEN = 256
BATCH = 16
STEPS = 240
LEARNING_RATE = 4e-3
WARMUP_STEPS = 10
THREADS = 1  # a second OpenMP thread waiting on a busy core makes each step many times slower
# Stdlib modules never trained on: the held-out text of tests and benchmarks.
HELDOUT_FILES = ("textwrap.py", "fractions.py", "shlex.py", "calendar.py")
# Parts of the stdlib folder that are not the library's own code (or are mostly test data).
EXCLUDED_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

CONFIG = dict(
    model_type="llama",
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=SEQ_LEN,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    initializer_range=0.02,
)


def stdlib_dir() -> Path:
    """The folder of the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _readable(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def training_files(budget: int = BYTE_BUDGET) -> list[Path]:
    """Stdlib ``.py`` files in a fixed pseudo-random order (sha256 of the relative path), taken
    until ``budget`` bytes; held-out and test files excluded."""
    root = stdlib_dir()
    candidates = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS.intersection(rel.parts) or rel.as_posix() in HELDOUT_FILES:
            continue
        candidates.append((hashlib.sha256(rel.as_posix().encode()).hexdigest(), path))
    chosen, total = [], 0
    for _, path in sorted(candidates):
        size = path.stat().st_size
        if size == 0 or total + size > budget:
            continue
        chosen.append(path)
        total += size
    return chosen


def heldout_text() -> str:
    """Text of the held-out stdlib modules (never trained on), for evaluation."""
    return "\n\n".join(_readable(stdlib_dir() / name) or "" for name in HELDOUT_FILES)


def load_tokenizer():
    """The demo tokenizer (``tokenizers``), which prepends ``<|bos|>`` to every encoding."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(DEMO_TOKENIZER_DIR / "tokenizer.json"))


def training_tokens(files: list[Path]) -> torch.Tensor:
    """One stream: each file as ``<|bos|> tokens <|eos|>``."""
    tokenizer = load_tokenizer()
    texts = [t for t in (_readable(p) for p in files) if t]
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(CONFIG["eos_token_id"])
    return torch.tensor(ids, dtype=torch.long)


def new_model(seed: int = SEED, config: dict | None = None):
    """The untrained model of ``config`` (default :data:`CONFIG`), initialised from ``seed``."""
    import transformers

    transformers.logging.set_verbosity_error()
    fields = dict(CONFIG if config is None else config)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = SEQ_LEN) -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows (first token of each unscored)."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = model(chunk[None]).logits[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def heldout_tokens(max_tokens: int = 2048) -> torch.Tensor:
    """The held-out text, tokenized, at most ``max_tokens``."""
    return torch.tensor(load_tokenizer().encode(heldout_text()).ids[:max_tokens], dtype=torch.long)


def fit(model, ids: torch.Tensor, steps: int, log=print, started: float | None = None) -> list[float]:
    """AdamW on random windows of ``ids`` (seeded order), warm-up then cosine decay; returns the losses."""
    started = time.perf_counter() if started is None else started
    model.train()
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:
        if step < WARMUP_STEPS:
            return LEARNING_RATE * (step + 1) / WARMUP_STEPS
        progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
        return LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(ids) - SEQ_LEN, (BATCH,), generator=generator)
        batch = torch.stack([ids[s : s + SEQ_LEN] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(round(loss.item(), 4))
        if step % 20 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.perf_counter() - started:.0f}s)")
    model.eval()
    return losses


def train(out: Path, steps: int = STEPS, log=print) -> dict:
    """Train and write the Hugging Face folder to ``out`` (via a temporary folder renamed into
    place); returns the facts written to ``training.json``."""
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    files = training_files()
    ids = training_tokens(files)
    log(f"training text: {len(files)} stdlib files, {sum(p.stat().st_size for p in files)} bytes, {len(ids)} tokens")
    model = new_model()
    eval_ids = heldout_tokens()
    random_ppl = perplexity(model, eval_ids)
    losses = fit(model, ids, steps, log, started)
    trained_ppl = perplexity(model, eval_ids)
    seconds = time.perf_counter() - started
    facts = {
        "script_sha256": script_sha256(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "seed": SEED,
        "steps": steps,
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "training_files": len(files),
        "training_tokens": len(ids),
        "heldout_files": list(HELDOUT_FILES),
        "heldout_tokens": len(eval_ids),
        "heldout_perplexity": round(trained_ppl, 4),
        "random_init_heldout_perplexity": round(random_ppl, 4),
        "final_loss": losses[-1],
        "seconds": round(seconds, 1),
    }
    log(f"held-out perplexity: trained {trained_ppl:.2f}, random init {random_ppl:.2f}; {seconds:.0f}s")
    save(model, out, facts)
    return facts


def save(model, out: Path, facts: dict) -> Path:
    """Write the model folder atomically (temporary sibling folder, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        model.generation_config.save_pretrained(staging)
        for name in TOKENIZER_FILES:
            shutil.copy(DEMO_TOKENIZER_DIR / name, staging / name)
        (staging / "training.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def script_sha256() -> str:
    """sha256 of this script (the trained model's cache key, with the Python version)."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps")
    args = parser.parse_args(argv)
    train(args.out, steps=args.steps)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
