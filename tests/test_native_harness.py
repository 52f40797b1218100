"""The native ExecuTorch harness (``harness/``, C++ on ExecuTorch's C++ runtime), built with CMake
against the installed wheel and run on real bundles under the HARNESS.md contract: its results
validate, its reference.json outputs pass the bundle's own check (fp32: to the exact limits, so
its LLM op kernels compute what ExecuTorch's do), bad input gives a failed record, and a host
device with ``harness`` set measures through it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from doubles.lab import read_jsonl, scenario, write_plan

from mobile_export.cli import main
from mobile_export.devicelab.harness import parse_results, reference_parity

pytestmark = pytest.mark.slow


def _prompt(tmp_path: Path, ids: list[int]) -> Path:
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps({"token_ids": ids}), encoding="utf-8")
    return path


def _run(harness: Path, bundle: Path, prompt: Path, output: Path, new_tokens: int = 8, warmup: int = 1):
    argv = [str(harness), "--bundle", str(bundle), "--prompt", str(prompt), "--new-tokens", str(new_tokens)]
    argv += ["--warmup", str(warmup), "--output", str(output)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def _sha(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained_bundles(trained_model, build_bundle) -> dict[str, Path]:
    args = ["--model-path", trained_model, "--target", "android", "--context-length", "128", "--no-eval"]
    return {
        "fp32": build_bundle(*args, "--quant", "fp32", "--embedding-quant", "none").bundle,
        "8da4w": build_bundle(*args, "--quant", "8da4w", "--embedding-quant", "int4").bundle,
    }


@pytest.mark.parametrize("kind", ["fp32", "8da4w"])
def test_results_validate_and_reference_outputs_pass_the_bundles_check(native_harness, trained_bundles, kind, tmp_path):
    bundle = trained_bundles[kind]
    done = _run(native_harness, bundle, _prompt(tmp_path, list(range(3, 19))), tmp_path / "out" / "r.json")
    assert done.returncode == 0, done.stderr[-2000:]
    data = parse_results((tmp_path / "out" / "r.json").read_text(), prompt_tokens=16, new_tokens=8, manifest_sha256=_sha(bundle))
    assert data["status"] == "ok" and data["runtime"]["name"] == "executorch"
    assert data["decode_tokens_per_s"] > 0 and data["prefill_tokens_per_s"] > 0 and data["load_s"] > 0
    assert data["peak_memory_bytes"] > data["rss_before_load_bytes"] > 0
    parity = reference_parity(bundle, data["reference_outputs"])
    assert parity["enforced"] and parity["passed"], parity
    if kind == "fp32":  # the exact limits: the harness's custom_sdpa/update_cache match ExecuTorch's
        assert parity["min_top1_agreement"] == 1.0 and parity["max_abs_logprob_diff"] <= 0.01


def test_bad_input_is_a_failed_record_never_a_crash(native_harness, trained_bundles, tmp_path):
    prompt = _prompt(tmp_path, [3, 4, 5, 6])
    broken = tmp_path / "no-pte"
    shutil.copytree(trained_bundles["fp32"], broken)
    (broken / "model.pte").write_bytes(b"not a program")
    other = tmp_path / "onnx-bundle"
    shutil.copytree(trained_bundles["fp32"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["artifact"] = {"file": "model.onnx", "format": "onnxruntime-genai"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    cases = {
        broken: "ExecuTorch could not load",
        other: "the bundle's artifact is onnxruntime-genai; this harness runs executorch-pte bundles",
        tmp_path / "missing": "cannot read",
    }
    for bundle, reason in cases.items():
        output = tmp_path / f"{bundle.name}.json"
        done = _run(native_harness, bundle, prompt, output)
        assert done.returncode != 0 and done.stderr.strip().splitlines()[-1].startswith("error: ")  # after runtime logs
        record = parse_results(output.read_text(), prompt_tokens=4, new_tokens=8, manifest_sha256="")
        assert record["status"] == "failed" and reason in record["error"], record

    too_long = _run(native_harness, trained_bundles["fp32"], _prompt(tmp_path, list(range(3, 125))), tmp_path / "l.json")
    assert too_long.returncode != 0
    assert "exceed the model's context of 128" in json.loads((tmp_path / "l.json").read_text())["error"]
    no_output = subprocess.run([str(native_harness), "--bundle", "x"], capture_output=True, text=True, timeout=60)
    assert no_output.returncode != 0 and no_output.stderr.startswith("error: usage:")


def test_a_host_device_with_a_native_harness_measures_through_it(native_harness, trained_bundles, tmp_path):
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(trained_bundles["8da4w"]), "name": "tiny"}],
        devices=[{"name": "host-native", "kind": "host", "harness": str(native_harness)}],
        scenarios=[scenario(prompt_tokens=16, new_tokens=8, repetitions=2, timeout_s=120)],
    )
    result = CliRunner().invoke(main, ["bench", str(plan), "--out", str(tmp_path / "results"), "-q"])
    assert result.exit_code == 0, result.output
    records = read_jsonl(tmp_path / "results" / "results.jsonl")
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    for record in records:
        assert record["parity"]["passed"] and record["metrics"]["decode_tokens_per_s"] > 0
        assert record["versions"]["runtime"].startswith("executorch 1.")
        assert record["versions"]["harness"].startswith("mobile-export-native-executorch 1")


def test_a_native_harness_path_that_is_not_an_executable_is_one_error(tmp_path, trained_bundles):
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(trained_bundles["8da4w"]), "name": "tiny"}],
        devices=[{"name": "host-native", "kind": "host", "harness": str(tmp_path / "nope")}],
        scenarios=[scenario(prompt_tokens=16, new_tokens=8, repetitions=1, timeout_s=60)],
    )
    result = CliRunner().invoke(main, ["bench", str(plan), "--out", str(tmp_path / "results"), "-q"])
    assert result.exit_code != 0
    assert "native harness" in result.output and "is not an executable file" in result.output


def test_the_onnx_harness_runs_an_onnx_bundle_to_the_exact_limits(
    native_harnesses, trained_model, trained_bundles, build_bundle, tmp_path
):
    args = ["--model-path", trained_model, "--target", "android", "--backend", "onnx", "--context-length", "128"]
    bundle = build_bundle(*args, "--quant", "fp32", "--embedding-quant", "none", "--no-eval").bundle
    harness = native_harnesses["onnxruntime-genai"]
    done = _run(harness, bundle, _prompt(tmp_path, list(range(3, 19))), tmp_path / "r.json")
    assert done.returncode == 0, done.stderr[-2000:]
    data = parse_results((tmp_path / "r.json").read_text(), prompt_tokens=16, new_tokens=8, manifest_sha256=_sha(bundle))
    assert data["status"] == "ok" and data["runtime"]["name"] == "onnxruntime-genai"
    assert data["decode_tokens_per_s"] > 0 and data["peak_memory_bytes"] > 0
    parity = reference_parity(bundle, data["reference_outputs"])
    assert parity["enforced"] and parity["passed"], parity
    assert parity["min_top1_agreement"] == 1.0 and parity["max_abs_logprob_diff"] <= 0.01

    # each harness refuses the other's bundles with a record saying so
    other = _run(harness, trained_bundles["fp32"], _prompt(tmp_path, [3, 4]), tmp_path / "o.json")
    assert other.returncode != 0
    record = json.loads((tmp_path / "o.json").read_text())
    assert record["status"] == "failed"
    assert record["error"] == "the bundle's artifact is executorch-pte; this harness runs onnxruntime-genai bundles"

