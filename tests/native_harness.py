"""Builds the native ExecuTorch harness (``harness/``) against the installed ExecuTorch wheel's
C++ package with CMake from pip (``cmake`` in the test extra), as harness/README.md says."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "harness"


def executorch_prefix() -> Path:
    """The installed ``executorch`` package folder: the prefix of its CMake package."""
    spec = importlib.util.find_spec("executorch")
    assert spec is not None and spec.submodule_search_locations, "executorch is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def cmake() -> str:
    """The ``cmake`` next to this interpreter (pip's, >= 3.28), else the one on PATH."""
    local = Path(sys.executable).with_name("cmake")
    return str(local) if local.is_file() else (shutil.which("cmake") or "cmake")


def build_harness(build_dir: Path) -> Path:
    """Configure and build ``harness/`` in ``build_dir``; the executable's path."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [cmake(), "-S", str(SOURCE), "-B", str(build_dir), *generator]
    configure.append(f"-DCMAKE_PREFIX_PATH={executorch_prefix()}")
    for argv in (configure, [cmake(), "--build", str(build_dir)]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return build_dir / "mobile-export-harness"
