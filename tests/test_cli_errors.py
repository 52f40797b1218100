"""Bad inputs to the CLI: one `error:` line on stderr naming the input, a non-zero exit, nothing written.

Every case here fails before the export step (which takes a minute or more): the helper checks
that "Export and lower" was never started. Cases whose correct outcome could, if the check were
missing, go on to an export use an output folder that already exists or corrupt weights, so a
regression fails fast instead of running a build.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner, Result
from fake_bundles import make_manifest
from safetensors.torch import save_file

from mobile_export.bundle import ModelInfo, TokenizerInfo, write_manifest
from mobile_export.cli import main
from mobile_export.modeling import SUPPORTED_MODEL_TYPES
from mobile_export.sources import DEMO_TOKENIZER_DIR

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result: Result) -> str:
    """Check the command failed with exactly one `error:` line, the last on stderr; return it."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], result.stderr
    assert "Export and lower" not in result.output, "the build reached the export step"
    return errors[0]


def build_error(out: Path, *args: str | Path) -> str:
    """Run ``build ... -o out``, check it failed cleanly and wrote nothing under ``out``."""
    result = invoke("build", *args, "-o", out)
    line = error_line(result)
    assert not out.exists() or os.listdir(out) == [], os.listdir(out)
    return line


def llama_folder(folder: Path) -> Path:
    """A model folder with a tiny Llama config.json (weights are up to the test)."""
    folder.mkdir(parents=True, exist_ok=True)
    transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ).to_json_file(str(folder / "config.json"))
    return folder


def corrupt_llama_folder(folder: Path) -> Path:
    llama_folder(folder)
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file")
    return folder


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "dist"


# --- recipe, target, quantization, backend ----------------------------------------------------


def test_unknown_recipe_suggests_close_name(out):
    line = build_error(out, "smolm2-135m", "--target", "android")
    assert line.startswith("error: unknown recipe 'smolm2-135m'")
    assert "did you mean 'smollm2-135m'" in line


def test_malformed_recipe_path(out, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\narchitecture: llama\nconfig: model_type: llama\n", encoding="utf-8")
    line = build_error(out, path, "--target", "android")
    assert f"{path}: line 3 is not valid YAML" in line


def test_invalid_recipe_path_names_the_key(out, tmp_path):
    data = yaml.safe_load((RECIPES_DIR / "demo.yaml").read_text())
    data["targets"]["android"]["quant"]["bogus"] = True
    path = tmp_path / "bogus.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    line = build_error(out, path, "--target", "android")
    assert str(path) in line
    assert "key 'targets.android.quant.bogus'" in line


def test_missing_recipe_path(out, tmp_path):
    line = build_error(out, tmp_path / "nothing.yaml", "--target", "android")
    assert f"recipe file {tmp_path / 'nothing.yaml'} does not exist" in line


def test_nothing_to_build(out):
    line = build_error(out, "--target", "android")
    assert "nothing to build" in line and "--model-path" in line


def test_unknown_target(out):
    line = build_error(out, "demo", "--target", "windows")
    assert "unknown target 'windows'" in line
    assert "android, ios" in line


def test_unknown_quantization(out):
    line = build_error(out, "demo", "--target", "android", "--quant", "3bit")
    assert "unknown quantization scheme '3bit'" in line
    assert "fp32, 8da4w, int8" in line and "xnnpack" in line


def test_unknown_embedding_quantization(out):
    line = build_error(out, "demo", "--target", "android", "--embedding-quant", "int2")
    assert "unknown embedding quantization 'int2'" in line
    assert "none, int8, int4" in line


@pytest.mark.parametrize("size", ["48", "-32", "256"])
def test_bad_group_size(out, size):
    line = build_error(out, "demo", "--target", "android", "--group-size", size)
    assert f"unsupported group size {size}" in line
    assert "32, 64, 128" in line


def test_non_integer_group_size_is_a_usage_error(out):
    result = invoke("build", "demo", "--target", "android", "--group-size", "big", "-o", out)
    assert result.exit_code == 2
    assert "'big' is not a valid integer" in result.stderr
    assert not out.exists()


def test_context_length_too_small(out):
    line = build_error(out, "demo", "--target", "android", "--context-length", "20")
    assert "context length 20 is too small" in line


def test_unknown_backend_suggests_close_name(out):
    line = build_error(out, "demo", "--target", "android", "--backend", "xnpack")
    assert "backend 'xnpack'" in line
    assert "available: coreml, coreml-executorch, onnx, xnnpack" in line
    assert "did you mean 'xnnpack'" in line


def test_backend_not_available_in_this_version(out):
    line = build_error(out, "demo", "--target", "ios", "--backend", "tflite")
    assert "unavailable backend 'tflite'" in line
    assert "available: coreml, coreml-executorch, onnx, xnnpack" in line


def test_backend_for_the_wrong_target(out):
    # refused before any download
    line = build_error(out, "smollm2-135m", "--target", "android", "--backend", "coreml")
    assert "backend 'coreml' cannot build for target 'android'" in line
    assert "it builds for: ios" in line


# --- the bad values below are accepted silently today ------------------------------------------
# The output folder already exists so that, while the bug stands, the build stops at the
# destination check (fast) instead of running an export.


def existing_output(out: Path) -> Path:
    (out / "demo-android").mkdir(parents=True)
    return out


def rejected(out: Path, *args: str) -> str:
    result = invoke("build", "demo", "--target", "android", *args, "-o", existing_output(out))
    line = error_line(result)
    assert os.listdir(out) == ["demo-android"] and os.listdir(out / "demo-android") == []
    return line


def test_group_size_zero_is_rejected(out):
    assert "unsupported group size 0" in rejected(out, "--group-size", "0")


def test_context_length_zero_is_rejected(out):
    assert "context length 0" in rejected(out, "--context-length", "0")


def test_context_length_beyond_model_positions_is_rejected(out):
    line = rejected(out, "--context-length", "4096")  # demo: max_position_embeddings 2048
    assert "4096" in line and "2048" in line


# --- model folders ----------------------------------------------------------------------------


def test_unsupported_architecture(out, tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    transformers.GPT2Config(
        vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    ).to_json_file(str(folder / "config.json"))
    save_file({"wte.weight": torch.zeros(64, 32)}, str(folder / "model.safetensors"))
    line = build_error(out, "--target", "android", "--model-path", folder)
    assert "unsupported architecture 'gpt2'" in line
    assert "supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES) in line


def test_model_folder_does_not_match_recipe(out, tmp_path):
    folder = corrupt_llama_folder(tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qwen2"
    (folder / "config.json").write_text(json.dumps(config))
    line = build_error(out, "smollm2-135m", "--target", "android", "--model-path", folder)
    assert f"{folder} holds a 'qwen2' model but recipe 'smollm2-135m' is 'llama'" in line


def test_pickle_only_folder_needs_allow_pickle(out, tmp_path):
    folder = llama_folder(tmp_path / "llama")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    line = build_error(out, "--target", "android", "--model-path", folder)
    assert f"{folder} has only pickle weights (pytorch_model.bin)" in line
    assert "--allow-pickle" in line


def test_folder_without_weights(out, tmp_path):
    folder = llama_folder(tmp_path / "llama")
    line = build_error(out, "--target", "android", "--model-path", folder)
    assert f"no weights in {folder}" in line


def test_corrupt_safetensors_names_the_file(out, tmp_path):
    folder = corrupt_llama_folder(tmp_path / "llama")
    line = build_error(out, "--target", "android", "--model-path", folder)
    assert f"corrupt safetensors file {folder / 'model.safetensors'}" in line


def test_folder_without_config(out, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    line = build_error(out, "--target", "android", "--model-path", folder)
    assert f"{folder} has no config.json" in line


def test_config_that_is_not_json(out, tmp_path):
    folder = tmp_path / "bad-config"
    folder.mkdir()
    (folder / "config.json").write_text("{not json", encoding="utf-8")
    line = build_error(out, "--target", "android", "--model-path", folder)
    assert f"{folder / 'config.json'} is not valid JSON" in line


def test_missing_model_folder_with_recipe(out, tmp_path):
    missing = tmp_path / "no-such-model"
    line = build_error(out, "demo", "--target", "android", "--model-path", missing)
    assert f"model folder {missing} does not exist" in line


def test_missing_model_folder_without_recipe(out, tmp_path):
    missing = tmp_path / "no-such-model"
    line = build_error(out, "--target", "android", "--model-path", missing)
    assert f"{missing} does not exist" in line


def test_model_folder_with_too_small_context_length(out, tmp_path):
    folder = corrupt_llama_folder(tmp_path / "llama")
    line = build_error(out, "--target", "android", "--model-path", folder, "--context-length", "8")
    assert "context length" in line and "8" in line


def test_model_folder_with_unusual_name(out, tmp_path):
    # Corrupt weights: once the name is handled, the build still stops before export.
    folder = corrupt_llama_folder(tmp_path / "My Model+v2")
    build_error(out, "--target", "android", "--model-path", folder)


# --- existing output --------------------------------------------------------------------------


def test_existing_output_folder_without_force(out):
    existing = out / "demo-android"
    existing.mkdir(parents=True)
    (existing / "model.pte").write_bytes(b"previous build")
    result = invoke("build", "demo", "--target", "android", "-o", out)
    line = error_line(result)
    assert f"output folder {existing} already exists" in line
    assert "--force" in line
    assert os.listdir(out) == ["demo-android"]
    assert os.listdir(existing) == ["model.pte"]
    assert (existing / "model.pte").read_bytes() == b"previous build"


# --- inspect and run --------------------------------------------------------------------------


@pytest.fixture
def fake_bundle(tmp_path) -> Path:
    """A folder shaped like a bundle (any bytes as model.pte) with a correct manifest."""
    folder = tmp_path / "demo-android"
    folder.mkdir()
    (folder / "model.pte").write_bytes(b"PTE" * 100)
    shutil.copy(DEMO_TOKENIZER_DIR / "tokenizer.json", folder / "tokenizer.json")
    manifest = make_manifest(
        model=ModelInfo(name="demo", architecture="llama", parameters=2_500_000, weights="random"),
        tokenizer=TokenizerInfo(files=["tokenizer.json"], bos_id=0, eos_ids=[1]),
    )
    write_manifest(folder, manifest)
    return folder


def test_inspect_intact_bundle(fake_bundle):
    result = invoke("inspect", fake_bundle)
    assert result.exit_code == 0, result.output
    assert "all checksums match" in result.stdout
    assert "demo (llama, 2.5M params, random weights)" in result.stdout
    assert "android / xnnpack (executorch-pte)" in result.stdout
    assert "2 files" in result.stdout
    assert result.stderr == ""


def test_inspect_modified_file(fake_bundle):
    (fake_bundle / "model.pte").write_bytes(b"PTX" * 100)  # same size, different content
    result = invoke("inspect", fake_bundle)
    line = error_line(result)
    assert f"bundle {fake_bundle} failed its checksum check: model.pte: sha256 mismatch" in line
    assert "✗ model.pte: sha256 mismatch" in result.stdout
    assert "all checksums match" not in result.stdout


def test_inspect_resized_file(fake_bundle):
    with (fake_bundle / "tokenizer.json").open("ab") as handle:
        handle.write(b"\n")
    line = error_line(invoke("inspect", fake_bundle))
    assert "tokenizer.json: size" in line
    assert "in manifest" in line


def test_inspect_missing_file(fake_bundle):
    (fake_bundle / "model.pte").unlink()
    line = error_line(invoke("inspect", fake_bundle))
    assert "model.pte: missing" in line


def test_inspect_folder_without_manifest(tmp_path):
    line = error_line(invoke("inspect", tmp_path))
    assert f"{tmp_path} has no manifest.json" in line


def test_inspect_missing_folder(tmp_path):
    line = error_line(invoke("inspect", tmp_path / "gone"))
    assert f"bundle {tmp_path / 'gone'} does not exist" in line


def test_run_missing_bundle(tmp_path):
    result = invoke("run", tmp_path / "gone", "--prompt", "hello")
    line = error_line(result)
    assert f"bundle {tmp_path / 'gone'} does not exist" in line
    assert result.stdout == ""


def test_run_modified_bundle_is_refused_before_loading(fake_bundle):
    (fake_bundle / "model.pte").write_bytes(b"PTX" * 100)
    result = invoke("run", fake_bundle, "--prompt", "hello")
    line = error_line(result)
    assert "failed its checksum check: model.pte: sha256 mismatch" in line
    assert result.stdout == ""


@pytest.mark.parametrize("count", ["0", "-3"])
def test_run_max_new_tokens_must_be_positive(fake_bundle, count):
    result = invoke("run", fake_bundle, "--prompt", "hello", "--max-new-tokens", count)
    line = error_line(result)
    assert line == "error: --max-new-tokens must be at least 1"
    assert result.stdout == ""


def test_hub_recipe_without_network_says_what_to_do(out, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = build_error(out, "smollm2-135m", "--target", "android")
    assert "could not download HuggingFaceTB/SmolLM2-135M-Instruct@12fd25f" in line
    assert "--model-path" in line and "--random-weights" in line
