"""Write the trained model folders the tests run on, into ``tests/fixtures/models/``.

Training is deterministic on one machine, but not across machines: matrix kernels differ by CPU
(vector width, blocking), so a few hundred optimizer steps end in different weights, and a test
whose expectation came from one machine's weights can fail on another. The tests therefore read
weights trained once and shipped with the repository, with their sha256 in ``SHA256SUMS``
(``tests/test_fixtures.py`` checks them). Run this script only to change the fixtures on purpose:

    python tools/make_test_fixtures.py            # retrain all, rewrite SHA256SUMS

What it writes:
- ``trained-tiny-llama/``: ``tools/train_tiny_model.py`` (4-layer Llama, ~2 min on 2 cores).
- ``tiny-<arch>/`` for every supported architecture (configs in ``tests/tiny_models.py``): a few seconds of training
  on ``mobile_export/assets/text/fixed_eval.txt`` each.
- ``heldout.txt``: the held-out stdlib text the trained model never saw, as this Python has it.
- ``calib.txt``: the GPTQ/AWQ tests' calibration text (stdlib ``argparse.py`` + ``difflib.py``,
  never the held-out text), so that every machine calibrates on the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "models"
SUMS = "SHA256SUMS"
CALIBRATION_FILES = ("argparse.py", "difflib.py")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_sums(root: Path) -> Path:
    """``SHA256SUMS`` over every file below ``root`` (sorted relative paths, sha256sum's format)."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != SUMS):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.relative_to(root).as_posix()}\n")
    out = root / SUMS
    out.write_text("".join(lines), encoding="utf-8")
    return out


def write_calibration(path: Path, stdlib: Path) -> Path:
    """The calibration text of the GPTQ/AWQ tests: stdlib modules, as this Python has them."""
    path.write_text("\n\n".join((stdlib / name).read_text(encoding="utf-8") for name in CALIBRATION_FILES))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixtures folder (replaced)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    trainer = _load(REPO_ROOT / "tools" / "train_tiny_model.py", "train_tiny_model")
    import tiny_models  # tests/tiny_models.py

    from mobile_export.modeling import SUPPORTED_MODEL_TYPES

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    trainer.train(out / "trained-tiny-llama")
    for arch in SUPPORTED_MODEL_TYPES:
        tiny_models.write_model_dir(out / f"tiny-{arch}", arch)
        print(f"wrote tiny-{arch}")
    (out / "heldout.txt").write_text(trainer.heldout_text(), encoding="utf-8")
    write_calibration(out / "calib.txt", trainer.stdlib_dir())
    print(f"wrote {write_sums(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
