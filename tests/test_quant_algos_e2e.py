"""GPTQ, AWQ, HQQ, rotation and 8-bit layers on the trained tiny Llama: end to end through the CLI,
and GPTQ's fidelity gain measured with the fidelity module.

Slow: three builds (each exports and lowers a real program), shared by the tests of this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mobile_export.cli import main

pytestmark = pytest.mark.slow

BUILDS = {
    "gptq": ["--quant-algo", "gptq"],
    "hqq": ["--quant-algo", "hqq"],
    "awq-rotate-8bit-head": ["--quant-algo", "awq", "--rotate", "--keep-8bit", "lm_head"],
}


@pytest.fixture(scope="module")
def texts() -> tuple[Path, Path]:
    """(calibration text, held-out eval text) as files."""
    from trained_model import FIXTURES

    return FIXTURES / "calib.txt", FIXTURES / "heldout.txt"  # shipped: the same bytes on every machine


@pytest.fixture(scope="module")
def builds(trained_model, texts, build_bundle) -> dict[str, tuple[dict, int, Path]]:
    """Manifest, .pte size and folder of each build in :data:`BUILDS` (8da4w g32, int8 embedding)."""
    calib, heldout = texts
    out = {}
    for name, extra in BUILDS.items():
        args = ["--model-path", trained_model, "--target", "android", "--quant", "8da4w", "--group-size", "32"]
        built = build_bundle(*args, "--calib-text", calib, "--eval-text", heldout, *extra)
        out[name] = (built.manifest, (built.bundle / "model.pte").stat().st_size, built.bundle)
    return out


def _comparison(manifest: dict, prefix: str) -> dict:
    return next(c for c in manifest["verification"]["comparisons"] if c["name"].startswith(prefix))


def test_algorithms_build_verify_and_record(builds):
    for name, (manifest, _, _) in builds.items():
        quant = manifest["quantization"]
        assert quant["algorithm"] == name.split("-")[0]
        assert _comparison(manifest, "lowering parity")["passed"]
        assert _comparison(manifest, "quantization cost")["passed"]
        assert manifest["verification"]["llm_runner"]["status"].startswith("ok")
        fidelity = manifest["fidelity"]
        assert fidelity["status"] == "ok" and 0 < fidelity["kl_mean"] < 0.05 and fidelity["top1_agreement"] > 0.85
    gptq = builds["gptq"][0]["quantization"]
    assert gptq["calibration"]["tokens"] == 8192 and gptq["gptq"]["act_order"] is True
    awq = builds["awq-rotate-8bit-head"][0]["quantization"]
    assert awq["rotate"] is True and awq["rotation"]["residual"] == "hadamard 128"
    assert awq["keep_8bit"]["layers"] == ["lm_head"] and 0 <= awq["awq_mean_alpha"] <= 1


def test_gptq_program_is_the_round_to_nearest_program(builds):
    """Same qd8-qb4w program, same bytes: GPTQ changes which integers, not how they are stored.
    Its integers come with bf16-exact scales, so the .pte matches eager PyTorch almost exactly:
    what remains is the rotary rows, which the program computes with ExecuTorch's cos/sin and
    eager with PyTorch's; a last-bit difference there may move a token's dynamic int8 activation
    by one step (1/255 of its range), a few 1e-3 of the logits, never more."""
    (gptq, gptq_size, _), (hqq, hqq_size, _) = builds["gptq"], builds["hqq"]
    assert abs(gptq_size - hqq_size) <= 64, (gptq_size, hqq_size)
    assert gptq["artifact"]["xnnpack_partitions"] == hqq["artifact"]["xnnpack_partitions"]
    lowering = _comparison(gptq, "lowering parity")
    assert lowering["max_abs_rel"] < 1e-2 and lowering["min_cosine"] > 0.99999, lowering


def test_keep_8bit_costs_what_the_manifest_says(builds):
    (_, gptq_size, _), (awq, awq_size, _) = builds["gptq"], builds["awq-rotate-8bit-head"]
    estimate = awq["quantization"]["keep_8bit"]["extra_bytes_estimate"]
    assert estimate > 0 and abs((awq_size - gptq_size) - estimate) <= 0.1 * estimate, (awq_size - gptq_size, estimate)


def test_gptq_cuts_kl_on_the_trained_model(trained_model, texts, builds):
    """Eager 8da4w g32 on the held-out text: GPTQ's mean KL against fp32 is well under round-to-nearest's;
    on the .pte (the builds' manifests, same text) GPTQ is below HQQ."""
    import transformers

    from mobile_export.backends import get_backend
    from mobile_export.build import convert
    from mobile_export.console import StepUI
    from mobile_export.fidelity import eager_reference, evaluate_runtime
    from mobile_export.quant_algos.calibration import load_calibration
    from mobile_export.quantize import QuantSpec

    calib, heldout = texts
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(trained_model))
    ids = tokenizer(heldout.read_text())["input_ids"][:1024]

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(str(trained_model), dtype=torch.float32).eval()

    class Eager:  # the converted decoder, a whole window per call
        def __init__(self, decoder):
            self.decoder = decoder

        def logits_all(self, tokens, start):
            with torch.no_grad():
                return self.decoder.run(torch.tensor([tokens]), start, start + len(tokens), all_positions=True)[0]

    reference = eager_reference(load(), ids, 256)
    kl = {}
    for algo in ("rtn", "gptq"):
        spec = QuantSpec(scheme="8da4w", group_size=32, embedding="none", algo=algo)
        encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
        calibration = load_calibration(calib, encode, algo, 256, 1024) if algo == "gptq" else None
        decoder, _ = convert(load(), spec, 256, get_backend("xnnpack"), StepUI(quiet=True), calibration)
        kl[algo] = evaluate_runtime(Eager(decoder), reference).kl_mean
    assert kl["gptq"] < 0.5 * kl["rtn"], kl
    pte = {name: builds[name][0]["fidelity"]["kl_mean"] for name in ("gptq", "hqq")}
    assert pte["gptq"] < 0.5 * pte["hqq"], pte


def test_eval_per_layer_ranks_layer_groups(builds, texts):
    """``eval --per-layer``: the bundle's figures plus its layer groups ranked by the KL each adds."""
    bundle = builds["hqq"][2]
    args = ["eval", str(bundle), "--text", str(texts[1]), "--max-tokens", "512", "--per-layer", "--json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["bundles"][0]
    assert row["status"] == "ok" and row["kl_mean"] > 0
    per_layer = row["per_layer"]
    assert per_layer["scheme"] == "8da4w-g32 hqq + emb int8" and per_layer["tokens"] == 510
    groups = per_layer["groups"]
    assert {g["group"] for g in groups} == {"embed_tokens", "lm_head", *(f"layers.{i}" for i in range(4))}
    assert [g["kl_mean"] for g in groups] == sorted((g["kl_mean"] for g in groups), reverse=True)
    assert all(g["kl_mean"] > 0 for g in groups)
    # keeping a 4-bit group at 8 bits costs bytes; the int8 embedding has nothing to gain
    assert all((g["extra_bytes_8bit"] > 0) == (g["group"] != "embed_tokens") for g in groups)
