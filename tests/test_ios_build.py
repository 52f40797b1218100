"""``--target ios``: Core ML packages, ExecuTorch with the Core ML delegate, and XNNPACK on iOS.

Builds run tiny, briefly trained Llama / Phi-3 / Qwen2 folders through the CLI; the saved package
is then read back (spec, MIL program, weights) rather than trusting what the build reports.
``MLModel.predict`` needs macOS: that test is present and skipped elsewhere with the reason.
"""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mobile_export.bundle import read_manifest, sha256_file
from mobile_export.cli import main

IS_MAC = platform.system() == "Darwin"


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir):
    return {arch: tiny_model_dir(arch) for arch in ("llama", "phi3", "qwen2")}


def _build(folder, out, *extra: str):
    # 128 tokens: the tiny Phi-3's longrope switches to its long factors past 128 positions
    args = ["build", "--model-path", str(folder), "--target", "ios", "--context-length", "128", "-o", str(out)]
    # --no-eval: fidelity on text is tested in test_fidelity_e2e; here it would only add time
    return CliRunner().invoke(main, [*args, "--quiet", "--no-eval", *extra], catch_exceptions=False)


def _read_package(bundle):
    from mobile_export.backends.coreml_checks import describe_weight, read_package

    package = read_package(bundle / "model.mlpackage")
    storage = {}
    for op in package.ops:
        if op.op_type == "linear" and op.inputs["weight"].op is not None:
            source = op.inputs["weight"].op
            storage[source.name] = describe_weight(source) or source.op_type
    return package, storage


EXPECTED_STORAGE = {
    "fp16": "const",
    "int4": "int4 blocks of 32",
    "int8": "int8 per channel",
    "palettize4": "lut 16 entries, 16-channel groups",
    "palettize6": "lut 64 entries, 16-channel groups",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,scheme",
    [
        ("llama", "fp16"),
        ("llama", "int4"),
        ("llama", "palettize4"),
        ("phi3", "palettize6"),
        ("phi3", "int4"),
        ("qwen2", "int8"),
    ],
)
def test_core_ml_package(model_dirs, tmp_path, arch, scheme):
    result = _build(model_dirs[arch], tmp_path, "--quant", scheme)
    assert result.exit_code == 0, result.output
    bundle = tmp_path / f"tiny-{arch}-ios"
    manifest = read_manifest(bundle)
    assert manifest.target == "ios" and manifest.backend == "coreml"
    assert manifest.artifact["format"] == "coreml-mlpackage" and manifest.min_os == {"ios": "18"}
    for entry in manifest.files:
        assert sha256_file(bundle / entry.path) == entry.sha256
    assert any(f.path.startswith("model.mlpackage/") for f in manifest.files)

    package, storage = _read_package(bundle)
    description = package.spec.description
    # I/O and states, read back from the saved spec
    assert [i.name for i in description.input] == ["input_ids", "causal_mask"]
    assert [o.name for o in description.output] == ["logits"]
    state_names = [s.name for s in description.state]
    assert state_names == [s.name for s in manifest.states]
    assert len(state_names) == 2 * 2  # k and v per layer
    cache_shape = list(description.state[0].type.stateType.arrayType.shape)
    assert cache_shape == manifest.states[0].shape == [1, 2, 128, 16]
    ids_range = description.input[0].type.multiArrayType.shapeRange.sizeRanges[1]
    assert (ids_range.lowerBound, ids_range.upperBound) == (1, manifest.context_length)
    # every linear weight stored as asked (attention + MLP per layer, and the head)
    assert len(storage) >= 2 * 7
    assert set(storage.values()) == {EXPECTED_STORAGE[scheme]}, storage
    meta = package.spec.description.metadata
    assert meta.userDefined["mobile_export.recipe"] == f"tiny-{arch}"
    assert meta.userDefined["mobile_export.context_length"] == str(manifest.context_length)
    assert meta.author == "mobile-export"

    comparisons = {c["name"]: c for c in manifest.verification["comparisons"]}
    converted = comparisons["converted module (fp16 weights) vs original"]
    assert converted["passed"] and converted["min_cosine"] >= 0.9995
    if scheme != "fp16":
        cost = comparisons["quantization cost (package weights in PyTorch vs original)"]
        assert cost["enforced"] and cost["passed"], cost  # trained weights: the cost is enforced
        assert cost["max_abs_diff"] > 0  # the package's weights really differ from the fp16 ones
        assert manifest.verification["coreml_package"]["weights_loaded_into_pytorch"] == len(storage)
    # the weight file alone (the package also holds the MIL text, large next to tiny weights)
    bits = manifest.verification["coreml_package"]["weight_file_bytes"] * 8 / manifest.model.parameters
    # (tiny models: fixed parts such as rope tables, norms and 64-byte blob alignment add several bits)
    low, high = {
        "fp16": (15.5, 18),
        "int8": (7.5, 12),
        "int4": (3.9, 9.5),
        "palettize4": (3.9, 10),
        "palettize6": (5.9, 11),
    }[scheme]
    assert low < bits < high, bits
    if not IS_MAC:
        assert manifest.verification["coreml_predict"].startswith("skipped: MLModel.predict needs macOS")


@pytest.mark.slow
def test_core_ml_stores_hqq_integers_and_8bit_layers_chosen_in_torch(model_dirs, tmp_path):
    """--quant-algo hqq and --keep-8bit on Core ML: torch picks every integer and scale, the
    package holds exactly them (int4 blocks, and int8 per channel for the kept layers)."""
    keep = ["--keep-8bit", "layers.0.*", "--keep-8bit", "lm_head"]
    result = _build(model_dirs["llama"], tmp_path, "--quant", "int4", "--quant-algo", "hqq", *keep)
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "tiny-llama-ios"
    manifest = read_manifest(bundle)
    assert manifest.quantization["algorithm"] == "hqq"
    assert "layers.0.mlp.down_proj" in manifest.quantization["keep_8bit"]["layers"]
    _, storage = _read_package(bundle)
    kinds = list(storage.values())
    assert set(kinds) == {"int4 blocks of 32", "int8 per channel"}, storage
    assert kinds.count("int8 per channel") >= 7  # layer 0's seven linears (the tied head is a gather's table too)
    comparisons = {c["name"]: c for c in manifest.verification["comparisons"]}
    exact = comparisons["package weights vs converted module"]
    assert exact["passed"] and exact["min_cosine"] >= 0.9995
    cost = comparisons["quantization cost (package weights in PyTorch vs original)"]
    assert cost["enforced"] and cost["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("arch,scheme", [("llama", "int4"), ("phi3", "fp32")])
def test_executorch_core_ml_delegate(model_dirs, tmp_path, arch, scheme):
    result = _build(model_dirs[arch], tmp_path, "--backend", "coreml-executorch", "--quant", scheme)
    assert result.exit_code == 0, result.output
    bundle = tmp_path / f"tiny-{arch}-ios-coreml-executorch"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["artifact"]["format"] == "executorch-pte"
    assert manifest["artifact"]["core_ml_partitions"] >= 1
    assert manifest["artifact"]["metadata"]["get_max_seq_len"] == manifest["context_length"]
    facts = manifest["verification"]["coreml_executorch"]
    assert facts["ops_outside_core_ml"] == []  # the whole decoder runs in Core ML
    assert (facts["compressed_linears"] >= 2 * 7) == (scheme != "fp32")
    data = (bundle / "model.pte").read_bytes()
    assert b"CoreMLBackend" in data
    names = [c["name"] for c in manifest["verification"]["comparisons"]]
    assert all(c["passed"] for c in manifest["verification"]["comparisons"]), names


@pytest.mark.slow
def test_xnnpack_on_ios_runs_in_the_llm_runner(model_dirs, tmp_path):
    result = _build(model_dirs["qwen2"], tmp_path, "--backend", "xnnpack", "--quant", "8da4w")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "tiny-qwen2-ios-xnnpack")
    assert manifest.target == "ios" and manifest.backend == "xnnpack"
    assert manifest.verification["llm_runner"]["status"].startswith("ok")


# --- bad input: refused before any work, one line, nothing written -----------------------------


def _error(tmp_path, *args: str) -> str:
    result = CliRunner().invoke(main, ["build", "demo", "--target", "ios", "-o", str(tmp_path / "dist"), *args])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ")
    assert not (tmp_path / "dist").exists()
    return lines[-1]


def test_deployment_target_too_old_for_states(tmp_path):
    line = _error(tmp_path, "--min-ios", "17")
    assert "iOS 17 is too old: KV cache as Core ML state needs iOS 18" in line
    assert "--min-ios 18" in line


def test_scheme_core_ml_cannot_do(tmp_path):
    line = _error(tmp_path, "--quant", "8da4w")
    assert "backend 'coreml' cannot do quantization '8da4w'" in line
    assert "fp16, int4, int8, palettize4, palettize6" in line


def test_kv_cache_over_budget_names_the_figure(tmp_path):
    # demo: 2 layers x 2 kv heads x 32 dims x 2048 tokens x 2 (k, v) x 2 bytes (fp16) = 1 MB
    line = _error(tmp_path, "--kv-budget-mb", "0.5", "--context-length", "2048")
    assert "the KV cache needs 1 MB for 2048 tokens, over the 0.5 MB budget" in line
    assert "--context-length 1024 or less" in line


def test_unknown_compute_units(tmp_path):
    line = _error(tmp_path, "--compute-units", "gpu")
    assert "unknown compute units 'gpu'" in line and "cpu_and_ne" in line


@pytest.mark.skipif(IS_MAC, reason="checks the refusal where Xcode cannot exist")
def test_compile_mlmodelc_needs_macos(tmp_path):
    line = _error(tmp_path, "--compile-mlmodelc")
    assert "--compile-mlmodelc needs macOS with Xcode's command-line tools" in line


def test_core_ml_options_on_xnnpack(tmp_path):
    line = _error(tmp_path, "--backend", "xnnpack", "--compute-units", "all")
    assert "backend 'xnnpack' takes no --compute-units" in line


@pytest.mark.skipif(IS_MAC, reason="checks the message shown where Core ML does not exist")
def test_running_a_core_ml_bundle_off_macos_is_a_clear_error(tmp_path):
    from mobile_export.errors import UserError
    from mobile_export.runtimes.coreml import CoreMLRuntime

    with pytest.raises(UserError) as info:
        CoreMLRuntime(tmp_path / "model.mlpackage")
    assert "Core ML packages run only on macOS 15+ or iOS 18+" in info.value.one_line()


def test_causal_mask_matches_the_eager_wrapper():
    """The mask the macOS runtime (and the iOS demo) feed equals the one the wrapper builds itself."""
    from mobile_export.modeling import additive_causal_mask
    from mobile_export.runtimes.coreml import causal_mask

    for start, seq in [(0, 5), (7, 1), (3, 4)]:
        expected = additive_causal_mask(start, seq, start + seq).numpy()
        assert np.array_equal(causal_mask(start, seq).astype(np.float32), expected)
    # position 3 sees keys 0..3, position 4 sees 0..4
    mask = causal_mask(3, 2)
    assert mask.dtype == np.float16 and mask.shape == (1, 1, 2, 5)
    assert np.array_equal(mask[0, 0], np.array([[0, 0, 0, 0, -np.inf], [0, 0, 0, 0, 0]], dtype=np.float16))


@pytest.mark.slow
@pytest.mark.skipif(not IS_MAC, reason="MLModel.predict needs macOS 15+; Linux has no Core ML runtime")
def test_core_ml_predict_with_state_matches_eager(model_dirs, tmp_path):
    result = _build(model_dirs["llama"], tmp_path, "--quant", "fp16")
    assert result.exit_code == 0, result.output
    from mobile_export.runtimes.coreml import CoreMLRuntime

    manifest = read_manifest(tmp_path / "tiny-llama-ios")
    assert manifest.verification["coreml_predict"] == "ran on macOS"
    runtime = CoreMLRuntime(tmp_path / "tiny-llama-ios" / "model.mlpackage")
    first = runtime.step([5, 6, 7, 8], 0)
    second = runtime.step([9], 4)
    assert first.shape == second.shape and torch.isfinite(second).all()
