"""The trained tiny Llama fixture (``tools/train_tiny_model.py``), trained once and cached.

The cache folder is keyed by the training script's sha256 and the Python version (the training
text is that Python's standard library), so editing the script retrains. A file lock makes
parallel test processes wait for one training instead of each running their own.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "train_tiny_model.py"


def _trainer():
    spec = importlib.util.spec_from_file_location("train_tiny_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/mobile-export`` (default ``~/.cache/mobile-export``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mobile-export"


def cache_key() -> str:
    """sha256 of the training script and the Python version, shortened."""
    digest = hashlib.sha256(SCRIPT.read_bytes() + sys.version.split()[0].encode())
    return digest.hexdigest()[:16]


def trained_model_dir() -> Path:
    """The trained model's Hugging Face folder, training it first if it is not cached yet."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"trained-tiny-llama-{cache_key()}"
    if (folder / "training.json").is_file():
        return folder
    with (root / f"{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be training it right now
        try:
            if not (folder / "training.json").is_file():
                _trainer().train(folder, log=lambda line: print(f"[train_tiny_model] {line}", file=sys.stderr))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


def heldout_text() -> str:
    """Stdlib source the model never saw in training."""
    return _trainer().heldout_text()
