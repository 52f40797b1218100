"""GGUF in: the header check, loading the real SmolLM2 GGUF like its converted folder, and the
bad-input cases (truncated, not GGUF, an architecture or tensor type we cannot load).

Bad GGUF files are written in tmp_path with the ``gguf`` package's own writer, so those tests
need no real model; the loading tests use the real SmolLM2-135M-Instruct Q4_1 file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mobile_export.cli import main
from mobile_export.gguf_source import find_gguf, read_header, readable_tensor_types, supported_architectures
from mobile_export.recipes import load_recipe
from mobile_export.sources import SourceOptions, load_source


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    """A GGUF file of ``arch`` holding ``tensors`` (their numpy dtypes give the GGML types)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def small_gguf(path: Path, arch: str = "llama") -> Path:
    return write_gguf(path, arch, {"token_embd.weight": np.ones((256, 256), dtype=np.float32)})


def build_error(out: Path, *args) -> str:
    """``build ARGS -o out`` failed with exactly one `error:` line, before any export, writing nothing."""
    result = CliRunner().invoke(main, ["build", *[str(a) for a in args], "-o", str(out)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    assert "Export and" not in result.output, "the build reached the export step"
    assert not out.exists() or os.listdir(out) == [], os.listdir(out)
    return errors[0]


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "dist"


RECIPE_OR_NOT = pytest.mark.parametrize("recipe", [[], ["smollm2-135m"]], ids=["no-recipe", "recipe"])


# --- bad input --------------------------------------------------------------------------------------


@RECIPE_OR_NOT
def test_file_that_is_not_gguf(out, tmp_path, recipe):
    path = tmp_path / "model.gguf"
    path.write_text("just some text, not a model\n")
    line = build_error(out, *recipe, "--model-path", path, "--target", "android")
    assert f"{path} is not a GGUF file" in line and "--model-path" in line


@RECIPE_OR_NOT
def test_truncated_gguf(out, tmp_path, recipe):
    whole = small_gguf(tmp_path / "whole.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[: len(whole) // 2])  # the tensor data stops halfway
    line = build_error(out, *recipe, "--model-path", path, "--target", "android")
    assert f"{path} is truncated or corrupt" in line and "re-download" in line


@RECIPE_OR_NOT
def test_gguf_of_an_architecture_we_cannot_export(out, tmp_path, recipe):
    path = small_gguf(tmp_path / "odd.gguf", arch="tinyarch")
    line = build_error(out, *recipe, "--model-path", path, "--target", "android")
    assert f"{path}: GGUF architecture 'tinyarch' cannot be exported" in line
    assert "supported GGUF architectures: " in line and "llama" in line and "qwen2" in line


def test_gguf_architecture_transformers_loads_but_we_do_not_export(out, tmp_path):
    path = small_gguf(tmp_path / "t5.gguf", arch="t5")  # transformers reads T5 GGUFs; it is no decoder
    line = build_error(out, "--model-path", path, "--target", "android")
    assert "GGUF architecture 't5' cannot be exported" in line


def test_gguf_with_a_tensor_type_the_loader_cannot_read(out, tmp_path):
    path = write_gguf(tmp_path / "ints.gguf", "llama", {"token_embd.weight": np.zeros((64, 64), dtype=np.int8)})
    line = build_error(out, "--model-path", path, "--target", "android")
    assert f"{path}: tensor type I8 cannot be dequantized by the GGUF loader" in line
    assert "readable types: " in line and "Q4_1" in line


def test_folder_with_two_gguf_files(out, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    small_gguf(folder / "a.gguf")
    small_gguf(folder / "b.gguf")
    line = build_error(out, "--model-path", folder, "--target", "android")
    assert f"{folder} holds 2 GGUF files (a.gguf, b.gguf)" in line and "--model-path FILE.gguf" in line


@RECIPE_OR_NOT
def test_missing_gguf_file(out, tmp_path, recipe):
    line = build_error(out, *recipe, "--model-path", tmp_path / "gone.gguf", "--target", "android")
    assert f"GGUF file {tmp_path / 'gone.gguf'} does not exist" in line


def test_supported_lists_are_what_both_loaders_take():
    supported = supported_architectures()
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"} <= set(supported)
    assert "t5" not in supported and "mamba" not in supported
    readable = readable_tensor_types()
    assert {"F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"} <= set(readable) and "I8" not in readable


def test_folder_with_safetensors_is_not_taken_for_gguf(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    small_gguf(tmp_path / "other.gguf")
    assert find_gguf(tmp_path) is None
    assert find_gguf(tmp_path / "other.gguf") == tmp_path / "other.gguf"


# --- the real SmolLM2 GGUF ----------------------------------------------------------------------------


def test_real_gguf_header(smollm2_gguf):
    header = read_header(smollm2_gguf)
    assert header.architecture == "llama" and header.model_type == "llama"
    assert header.file_type == "Q4_1"
    assert header.tensor_types["Q4_1"] >= 30 * 7  # every projection of the 30 layers
    assert set(header.tensor_types) <= set(readable_tensor_types())
    assert header.sha256 == hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    entry = header.manifest_entry()
    assert entry["file"] == smollm2_gguf.name and "dequantized" in entry["reference"]


@pytest.fixture(scope="module")
def gguf_source(smollm2_gguf, tmp_path_factory):
    """The real GGUF loaded by the project's loader, from a folder that holds only the GGUF."""
    folder = tmp_path_factory.mktemp("gguf-folder")
    (folder / smollm2_gguf.name).symlink_to(smollm2_gguf)
    return load_source(load_recipe("smollm2-135m"), SourceOptions(model_path=folder))


def test_gguf_source_matches_its_converted_folder(gguf_source, smollm2_dir):
    folder = load_source(load_recipe("smollm2-135m"), SourceOptions(model_path=smollm2_dir))
    assert gguf_source.source_format == "gguf" and gguf_source.gguf.file_type == "Q4_1"
    assert folder.source_format == "safetensors" and folder.gguf is None
    assert gguf_source.dtype == torch.float32 and gguf_source.parameters == folder.parameters
    mine, theirs = gguf_source.model.config.to_dict(), folder.model.config.to_dict()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keys += ("num_key_value_heads", "head_dim", "rope_parameters", "rms_norm_eps", "tie_word_embeddings")
    for key in (*keys, "bos_token_id", "eos_token_id", "max_position_embeddings"):
        assert theirs.get(key) is not None and mine.get(key) == theirs[key], key
    assert "quantization_config" not in mine  # the GGUF quantizer is gone: the model exports like any other
    assert getattr(gguf_source.model, "hf_quantizer", None) is None

    text = "The capital of France is"
    ids = gguf_source.tokenizer(text)["input_ids"]
    assert ids == folder.tokenizer(text)["input_ids"]
    assert gguf_source.tokenizer.chat_template == folder.tokenizer.chat_template
    assert "<|im_start|>" in gguf_source.tokenizer.chat_template
    with torch.no_grad():
        a = gguf_source.model(torch.tensor([ids])).logits[0]
        b = folder.model(torch.tensor([ids])).logits[0]
    assert torch.equal(a, b)  # the same dequantized fp32 weights, bit for bit
    assert gguf_source.tokenizer.decode(int(a[-1].argmax())) == " Paris"
    assert gguf_source.generation_eos_ids == [2]
