"""Shared test setup: tests import helpers from this folder (tiny_models, trained_model)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_model() -> Path:
    """Folder of the trained tiny Llama, shipped in tests/fixtures/models (read-only)."""
    from trained_model import trained_model_dir

    return trained_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir():
    """``tiny_model_dir(arch)``: the briefly trained tiny folder of ``arch``, named ``tiny-<arch>``,
    shipped in tests/fixtures/models and shared by the build tests (read-only)."""
    from trained_model import tiny_model_dir

    return tiny_model_dir
