"""GGUF in, end to end, on the real SmolLM2-135M-Instruct Q4_1 file: one ONNX build from the
``.gguf`` (recipe ``smollm2-135m``), its manifest's record of the source, the chat template in
the bundle, and ``run --chat`` answering a real question.

One real build (~3-5 minutes on two busy cores), shared by the tests of this module. It is int8
(per-channel), whose quantization cost passes the build's own verification on these weights;
the 4-bit defaults are the subject of the fidelity work (issue 12, parts 3-4).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mobile_export.build import BuildRequest, resolve_recipe
from mobile_export.bundle import read_manifest
from mobile_export.cli import main

pytestmark = pytest.mark.slow


def invoke(*args, input: str | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def test_gguf_without_recipe_gets_a_recipe_from_its_header(smollm2_gguf):
    recipe = resolve_recipe(BuildRequest(recipe=None, target="android", model_path=smollm2_gguf))
    assert recipe.name == "smollm2-135m-instruct.q4_1" and recipe.source == "local"
    assert recipe.architecture == "llama"
    assert recipe.config["vocab_size"] == 49152 and recipe.config["num_hidden_layers"] == 30
    assert recipe.context_length == 2048 and recipe.eos_ids() == [2]


@pytest.fixture(scope="module")
def gguf_bundle(smollm2_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf-build")
    args = ["build", "smollm2-135m", "--model-path", smollm2_gguf, "--target", "android", "--backend", "onnx"]
    result = invoke(*args, "--quant", "int8", "--no-eval", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    return out / "smollm2-135m-android-onnx"


def test_manifest_records_the_gguf_source(gguf_bundle, smollm2_gguf):
    manifest = read_manifest(gguf_bundle)
    model = manifest.model
    assert model.weights == "local" and model.source_format == "gguf"
    assert model.path == str(smollm2_gguf.resolve())
    assert model.gguf["file"] == smollm2_gguf.name and model.gguf["file_type"] == "Q4_1"
    assert model.gguf["tensor_types"]["Q4_1"] >= 210
    from mobile_export.bundle import sha256_file

    assert model.gguf["sha256"] == sha256_file(smollm2_gguf)
    assert "dequantized" in model.gguf["reference"]
    assert all(c["passed"] for c in manifest.verification["comparisons"] if c["enforced"])

    # eval finds the original model again from the manifest: the GGUF file itself
    from mobile_export.evaluate import reference_source

    source = reference_source(gguf_bundle, manifest, None, None)
    assert source.options.model_path == smollm2_gguf.resolve()


def test_bundle_carries_the_gguf_chat_template(gguf_bundle):
    manifest = read_manifest(gguf_bundle)
    tokenizer = manifest.tokenizer
    assert tokenizer.chat_template.startswith("{% for message in messages %}")
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.end_of_turn_ids == [2] and 2 in tokenizer.eos_ids  # <|im_end|>
    assert tokenizer.add_bos is False  # SmolLM2's tokenizer adds no BOS; its chat template opens turns itself
    assert (gguf_bundle / "chat_template.jinja").read_text() == tokenizer.chat_template
    assert json.loads((gguf_bundle / "tokenizer_config.json").read_text())["chat_template"] == tokenizer.chat_template


def test_chat_answers_a_real_question(gguf_bundle, tmp_path):
    result = invoke("run", gguf_bundle, "--chat", "--prompt", "What is the capital of France?", "-n", "24")
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
    assert "<|im_end|>" not in result.stdout and "<|im_start|>" not in result.stdout

    two_turns = invoke(
        "run", gguf_bundle, "--chat", "-n", "24", input="What is the capital of France?\nAnd of Germany?\n"
    )
    assert two_turns.exit_code == 0, two_turns.output
    first, second = two_turns.stdout.splitlines()[:2]
    assert "Paris" in first and "Berlin" in second  # "And of Germany?" only makes sense with the history


def test_copied_bundle_verifies_against_its_reference(gguf_bundle, tmp_path):
    copy = tmp_path / "copied"
    shutil.copytree(gguf_bundle, copy)
    result = invoke("verify", copy)
    assert result.exit_code == 0, result.output
