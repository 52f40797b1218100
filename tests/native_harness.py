"""Builds the native harnesses (``harness/``): ``mobile-export-harness`` against the installed
ExecuTorch wheel's C++ package and ``mobile-export-harness-onnx`` against the onnxruntime-genai
wheel's library, with CMake from pip (``cmake`` in the test extra), as harness/README.md says."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "harness"


def package_dir(name: str) -> Path:
    """An installed package's folder (``executorch``: the prefix of its CMake package)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def cmake() -> str:
    """The ``cmake`` next to this interpreter (pip's, >= 3.28), else the one on PATH."""
    local = Path(sys.executable).with_name("cmake")
    return str(local) if local.is_file() else (shutil.which("cmake") or "cmake")


def build_harnesses(build_dir: Path) -> dict[str, Path]:
    """Configure and build ``harness/`` in ``build_dir``: the executables by artifact format."""
    from importlib import metadata

    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [cmake(), "-S", str(SOURCE), "-B", str(build_dir), *generator]
    (ort,) = sorted((package_dir("onnxruntime") / "capi").glob("libonnxruntime.so.*"))
    configure += [
        f"-DCMAKE_PREFIX_PATH={package_dir('executorch')}",
        f"-DORT_GENAI_LIBRARY={package_dir('onnxruntime_genai') / 'libonnxruntime-genai.so'}",
        f"-DORT_LIBRARY={ort}",
        f"-DORT_GENAI_VERSION={metadata.version('onnxruntime-genai')}",
    ]
    for argv in (configure, [cmake(), "--build", str(build_dir)]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return {
        "executorch-pte": build_dir / "mobile-export-harness",
        "onnxruntime-genai": build_dir / "mobile-export-harness-onnx",
    }
