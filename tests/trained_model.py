"""The trained model folders the tests run on, shipped in ``tests/fixtures/models/``.

They are trained once by ``tools/make_test_fixtures.py`` and committed with their sha256
(``SHA256SUMS``, checked by ``tests/test_fixtures.py``), not retrained per machine: training is
deterministic on one machine but not across CPUs, and expectations must not depend on which
machine trained the weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"
SUMS = FIXTURES / "SHA256SUMS"


def trained_model_dir() -> Path:
    """The trained tiny Llama (``tools/train_tiny_model.py``): 4 layers, hidden 128, on stdlib source."""
    return FIXTURES / "trained-tiny-llama"


def tiny_model_dir(arch: str) -> Path:
    """A briefly trained tiny folder of ``arch`` (``tests/tiny_models.py`` config), named ``tiny-<arch>``."""
    folder = FIXTURES / f"tiny-{arch}"
    if not folder.is_dir():
        raise FileNotFoundError(f"no fixture {folder}: run python tools/make_test_fixtures.py")
    return folder


def heldout_text() -> str:
    """Stdlib source the trained model never saw (a snapshot, so every Python reads the same text)."""
    return (FIXTURES / "heldout.txt").read_text(encoding="utf-8")


def expected_sums() -> dict[str, str]:
    """Relative path -> sha256, as ``SHA256SUMS`` records them."""
    rows = (line.split("  ", 1) for line in SUMS.read_text(encoding="utf-8").splitlines() if line)
    return {path: digest for digest, path in rows}


def actual_sums() -> dict[str, str]:
    """Relative path -> sha256 of every fixture file on disk."""
    return {
        p.relative_to(FIXTURES).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(FIXTURES.rglob("*"))
        if p.is_file() and p != SUMS
    }
