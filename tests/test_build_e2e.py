"""End to end through the CLI: build → verify (host ExecuTorch runtime and its C++ LLM runner) → run.

Slow (each build exports and lowers a real program): one build per architecture and scheme.
"""

from __future__ import annotations

import json
import re
import zipfile

import pytest
from click.testing import CliRunner

from mobile_export.bundle import read_manifest, sha256_file
from mobile_export.cli import main

pytestmark = pytest.mark.slow


def _build(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["build", *args, "--quiet"], catch_exceptions=False)
    return result.exit_code, result.output


def _check_bundle(bundle, *, scheme: str, arch: str, weights: str) -> dict:
    manifest = read_manifest(bundle)
    assert manifest.model.architecture == arch
    assert manifest.model.weights == weights
    assert manifest.quantization["scheme"] == scheme
    assert manifest.backend == "xnnpack" and manifest.artifact["format"] == "executorch-pte"
    files = {f.path: f for f in manifest.files}
    assert "model.pte" in files and "tokenizer.json" in files
    for entry in manifest.files:  # every listed checksum is the file's real one
        assert sha256_file(bundle / entry.path) == entry.sha256
    meta = manifest.artifact["metadata"]
    assert meta["get_max_seq_len"] == manifest.context_length
    assert meta["use_kv_cache"] is True and meta["enable_dynamic_shape"] is True
    assert manifest.verification["llm_runner"]["status"].startswith("ok")
    with zipfile.ZipFile(bundle.parent / f"{bundle.name}.zip") as archive:
        names = set(archive.namelist())
    assert {f"{bundle.name}/{p}" for p in files} | {f"{bundle.name}/manifest.json"} == names
    return json.loads((bundle / "manifest.json").read_text())


def _comparison(manifest: dict, prefix: str) -> dict:
    return next(c for c in manifest["verification"]["comparisons"] if c["name"].startswith(prefix))


def _assert_reads_as_text(text: str) -> None:
    """Generated text that reads as language: words (not BPE fragments) of the prose the demo was
    trained on, from a varied vocabulary. Random weights give one token repeated, or fragments
    ("eric", "ptio") that are no word of that prose."""
    from pydoc_data.topics import topics

    known = set(re.findall(r"[a-z]+", " ".join(topics.values()).lower()))
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 10 and len(set(words)) >= 6, text
    assert max(words.count(w) for w in set(words)) <= len(words) / 2, text
    assert sum(w in known for w in words) >= 0.9 * len(words), text


def test_demo_build_run_inspect(tmp_path):
    """The README's first command: the built-in demo recipe, default quantization."""
    code, out = _build(["demo", "--target", "android", "-o", str(tmp_path)])
    assert code == 0, out
    bundle = tmp_path / "demo-android"
    manifest = _check_bundle(bundle, scheme="8da4w", arch="llama", weights="builtin")
    lowering = _comparison(manifest, "lowering parity")
    assert lowering["passed"] and lowering["min_cosine"] >= 0.995
    # shipped trained weights: the quantization cost is judged, not just recorded
    assert manifest["verification"]["weights_meaningful"] is True
    assert _comparison(manifest, "quantization cost")["enforced"] and _comparison(manifest, "quantization cost")["passed"]
    assert manifest["quantization"]["embedding"] == "int8"
    assert manifest["quantization"]["bits_per_weight"] < 8  # int4 weights + int8 embedding, scales included

    run = CliRunner().invoke(main, ["run", str(bundle), "--prompt", "The import statement", "-n", "64"])
    assert run.exit_code == 0, run.output
    assert run.output.startswith("The import statement")
    assert "decode" in run.output and "tok/s" in run.output
    _assert_reads_as_text(run.stdout)

    inspected = CliRunner().invoke(main, ["inspect", str(bundle)])
    assert inspected.exit_code == 0 and "all checksums match" in inspected.output

    # the original model of a built-in bundle is the recipe's shipped weights: eval needs no --model-path
    from mobile_export.fidelity import FIXED_EVAL_TEXT

    evaluated = CliRunner().invoke(
        main, ["eval", str(bundle), "--text", str(FIXED_EVAL_TEXT), "--max-tokens", "256", "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    row = json.loads(evaluated.stdout)["bundles"][0]
    assert row["status"] == "ok" and 0 < row["kl_mean"] < 0.1 and row["top1_agreement"] > 0.8

    again, out = _build(["demo", "--target", "android", "-o", str(tmp_path)])
    assert again != 0 and "already exists" in out


def test_llama_fp32_from_folder_matches_original_tightly(tmp_path, tiny_model_dir):
    folder = tiny_model_dir("llama")
    code, out = _build(
        [
            "--model-path",
            str(folder),
            "--target",
            "android",
            "--quant",
            "fp32",
            "--embedding-quant",
            "none",
            "-o",
            str(tmp_path / "dist"),
        ]
    )
    assert code == 0, out
    manifest = _check_bundle(tmp_path / "dist" / "tiny-llama-android", scheme="fp32", arch="llama", weights="local")
    parity = _comparison(manifest, "parity")
    assert parity["passed"] and parity["enforced"]
    assert parity["max_abs_rel"] <= 1e-3 and parity["top1_agreement"] == 1.0
    assert manifest["quantization"]["bits_per_weight"] > 30  # fp32 weights


@pytest.mark.parametrize(
    ("arch", "scheme", "extra"),
    [
        ("phi3", "8da4w", ["--group-size", "32", "--embedding-quant", "int4"]),
        ("gemma3_text", "int8", ["--context-length", "64", "--embedding-quant", "int8"]),
        ("gemma2", "fp32", ["--context-length", "48", "--embedding-quant", "int4"]),
        ("qwen3", "8da4w", ["--group-size", "64", "--embedding-quant", "none"]),
    ],
)
def test_architectures_and_schemes(tmp_path, tiny_model_dir, arch, scheme, extra):
    folder = tiny_model_dir(arch)
    args = ["--model-path", str(folder), "--target", "android", "--quant", scheme, *extra, "-o", str(tmp_path / "dist")]
    args.append("--no-eval")  # fidelity on text is tested in test_fidelity_e2e; here it would only add time
    code, out = _build(args)
    assert code == 0, out
    name = f"tiny-{arch}".lower()
    manifest = _check_bundle(tmp_path / "dist" / f"{name}-android", scheme=scheme, arch=arch, weights="local")
    lowering = _comparison(manifest, "lowering parity")
    assert lowering["passed"] and lowering["min_cosine"] >= 0.995
    cost = _comparison(manifest, "quantization cost")
    assert cost["enforced"] and cost["passed"]  # briefly trained weights: quantization must keep them
    quant = manifest["quantization"]
    assert (quant["quantized_linears"] > 0) == (scheme != "fp32")
    assert quant["quantized_embeddings"] == (0 if quant["embedding"] == "none" else 1)


def test_recipe_file_with_random_weights(tmp_path):
    code, out = _build(
        ["tests/fixtures/tiny-qwen2.yaml", "--target", "android", "--random-weights", "-o", str(tmp_path)]
    )
    assert code == 0, out
    manifest = _check_bundle(tmp_path / "tiny-qwen2-android", scheme="8da4w", arch="qwen2", weights="random")
    assert manifest["quantization"]["embedding"] == "int4"
    assert manifest["verification"]["weights_meaningful"] is False
    assert not _comparison(manifest, "quantization cost")["enforced"]
