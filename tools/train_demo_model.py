"""Train the built-in demo model's weights (``mobile_export/assets/demo/model.safetensors``).

The demo recipe (``recipes/demo.yaml``: a 2-layer Llama, hidden 256, the project's 1024-token
tokenizer) needs no download. With random weights its output is one token repeated; trained for
a few minutes on English prose it writes text that reads as language, so the README's first
command shows what a bundle does. The prose is the Python documentation's language-reference
topics that every CPython ships (``pydoc_data/topics.py``, PSF license); the held-out text is the
project's own ``fixed_eval.txt``. Deterministic on one machine (seeded init and data order, one
thread); the weights are committed, stored as fp16 (~3.5 MB), with what they were trained on in
``mobile_export/assets/demo/training.json``.

    python tools/train_demo_model.py [--steps N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "mobile_export" / "assets" / "demo"
HELDOUT = REPO_ROOT / "mobile_export" / "assets" / "text" / "fixed_eval.txt"
STEPS = 400


def _trainer():
    spec = importlib.util.spec_from_file_location("train_tiny_model", REPO_ROOT / "tools" / "train_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prose() -> str:
    """The language-reference topics of the running Python's documentation, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps")
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="folder for model.safetensors + training.json")
    args = parser.parse_args(argv)
    trainer = _trainer()
    torch.set_num_threads(trainer.THREADS)
    started = time.perf_counter()
    config = yaml.safe_load((REPO_ROOT / "recipes" / "demo.yaml").read_text())["config"]
    tokenizer = trainer.load_tokenizer()
    ids = torch.tensor(tokenizer.encode(prose()).ids, dtype=torch.long)
    eval_ids = torch.tensor(tokenizer.encode(HELDOUT.read_text(encoding="utf-8")).ids[:2048], dtype=torch.long)
    model = trainer.new_model(config=config)
    random_ppl = trainer.perplexity(model, eval_ids)
    losses = trainer.fit(model, ids, args.steps, print, started)
    trained_ppl = trainer.perplexity(model, eval_ids)
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    facts = {
        "text": "pydoc_data/topics.py (Python documentation topics, PSF license)",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "steps": args.steps,
        "training_tokens": len(ids),
        "heldout": "mobile_export/assets/text/fixed_eval.txt",
        "heldout_perplexity": round(trained_ppl, 2),
        "random_init_heldout_perplexity": round(random_ppl, 2),
        "final_loss": losses[-1],
        "stored_dtype": "float16",
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "training.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    print(f"held-out perplexity: trained {trained_ppl:.1f}, random init {random_ppl:.1f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
