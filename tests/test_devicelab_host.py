"""The host device end to end on a real tiny bundle: real measurements in ExecuTorch's runtime.

Slow: builds one tiny bundle (a 1-layer Llama shape, ~25 s) and starts the host fork server
(imports PyTorch and ExecuTorch once, ~10 s). Numbers are checked for sane ranges, not values.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from doubles.lab import SERIAL, adb_double, read_jsonl, scenario, write_plan

import mobile_export.devicelab.harness as harness_module
from mobile_export.cli import main

pytestmark = pytest.mark.slow

TINY_RECIPE = {
    "name": "tiny-bench",
    "description": "1-layer Llama shape for device-lab tests.",
    "source": "builtin",
    "license": "apache-2.0",
    "architecture": "llama",
    "context_length": 64,
    "config": {
        "model_type": "llama",
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    "targets": {"android": {"backend": "xnnpack", "quant": {"scheme": "fp32", "embedding": "none"}}},
}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, build_bundle) -> Path:
    """A real bundle built by `mobile-export build` (verified by the build itself)."""
    recipe = tmp_path_factory.mktemp("devicelab-build") / "tiny-bench.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE), encoding="utf-8")
    return build_bundle(recipe, "--target", "android", "--random-weights").bundle


HOST = {"name": "host", "kind": "host"}


def bench(plan: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["bench", str(plan), "--out", str(out), *extra])


def test_host_bench_real_measurements_report_and_resume(tmp_path, tiny_bundle):
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(tiny_bundle)}],
        devices=[HOST],
        scenarios=[scenario(prompt_tokens=16, new_tokens=8, warmup=1, repetitions=3, timeout_s=120)],
    )
    out = tmp_path / "results"
    result = bench(plan, out)
    assert result.exit_code == 0, result.output
    for rep in (1, 2, 3):
        assert f"] host · tiny-bench-android · short · rep {rep}/3: ok · ttft" in result.output
    assert "ETA" in result.output and "3 measured now (0 failed)" in result.output
    records = read_jsonl(out / "results.jsonl")
    assert [(r["repetition"], r["status"]) for r in records] == [(1, "ok"), (2, "ok"), (3, "ok")]
    for record in records:
        m = record["metrics"]
        assert m["prompt_tokens"] == 16 and m["generated_tokens"] == 8
        assert 0 < m["load_s"] < 10 and 0 < m["ttft_s"] < 10
        assert 10 < m["prefill_tokens_per_s"] < 1e7 and 10 < m["decode_tokens_per_s"] < 1e7
        assert m["ttft_s"] == pytest.approx(16 / m["prefill_tokens_per_s"])
        # the OS's peak for the measurement process: above its own baseline, below any sane bound
        assert m["memory_source"] == "VmHWM (/proc/self/status)"
        assert 50e6 < m["rss_before_load_bytes"] <= m["peak_memory_bytes"] < 8e9
        assert record["versions"]["runtime"] == f"executorch {metadata.version('executorch')}"
        assert record["device"]["kind"] == "host" and record["device"]["cpu_count"] >= 1
        assert record["bundle"]["backend"] == "xnnpack" and record["bundle"]["context_length"] == 64
    shown = CliRunner().invoke(main, ["report", str(out)])
    assert shown.exit_code == 0, shown.output
    summary = json.loads((out / "summary.json").read_text())
    decode = summary["groups"][0]["metrics"]["decode_tokens_per_s"]
    assert decode["n"] == 3 and decode["min"] <= decode["median"] <= decode["max"]
    assert f"{decode['median']:,.0f}" in (out / "report.md").read_text().replace(".0 (", " (")

    again = bench(plan, out)
    assert again.exit_code == 0, again.output
    assert "nothing to measure: all 3 measurements are already in" in again.output
    assert len(read_jsonl(out / "results.jsonl")) == 3


def test_host_timeout_kills_the_measurement_and_the_run_goes_on(tmp_path, tiny_bundle):
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(tiny_bundle)}],
        devices=[HOST],
        scenarios=[
            scenario("instant", repetitions=1, timeout_s=0.001),  # cannot load and generate in a millisecond
            scenario("normal", repetitions=1, timeout_s=120),
        ],
    )
    result = bench(plan, tmp_path / "results", "--quiet")
    assert result.exit_code == 5, result.output
    records = read_jsonl(tmp_path / "results" / "results.jsonl")
    assert [(r["scenario"]["name"], r["status"]) for r in records] == [("instant", "timeout"), ("normal", "ok")]
    assert records[0]["failure"] == {
        "kind": "timeout",
        "reason": "no result within 0.001s; the measurement process was killed",
    }


def test_host_bundle_for_a_backend_this_host_cannot_run_is_recorded_failed(tmp_path, tiny_bundle):
    other = shutil.copytree(tiny_bundle, tmp_path / "tiny-coreml")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["backend"] = "coreml"  # manifest.json is not in its own file list: checksums still match
    manifest["artifact"]["format"] = "coreml-mlpackage"  # what opens a bundle is its artifact's format
    (other / "manifest.json").write_text(json.dumps(manifest))
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(other)}, {"path": str(tiny_bundle)}],
        devices=[HOST],
        scenarios=[scenario(repetitions=1)],
    )
    result = bench(plan, tmp_path / "results", "--quiet")
    assert result.exit_code == 5, result.output
    records = read_jsonl(tmp_path / "results" / "results.jsonl")
    assert [(r["bundle"]["name"], r["status"]) for r in records] == [
        ("tiny-coreml", "failed"),
        ("tiny-bench-android", "ok"),
    ]
    assert records[0]["failure"]["kind"] == "harness_error"
    assert re.search(r"core ?ml", records[0]["failure"]["reason"], re.IGNORECASE)


def test_adb_double_runs_the_real_host_harness_on_the_pushed_bundle(tmp_path, monkeypatch, tiny_bundle):
    """The host harness follows the harness contract: pushed through the adb test double and run
    there as the phone's harness, it measures the real bundle in ExecuTorch."""
    adb_double(tmp_path, monkeypatch)
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(tiny_bundle)}],
        devices=[{"name": "emulated", "kind": "android", "serial": SERIAL, "harness": harness_module.__file__}],
        scenarios=[scenario(repetitions=1, timeout_s=300)],
    )
    result = bench(plan, tmp_path / "results", "--quiet")
    (record,) = read_jsonl(tmp_path / "results" / "results.jsonl")
    assert result.exit_code == 0, record["failure"]
    assert record["status"] == "ok" and record["device"]["model"] == "Google Pixel 8"
    assert record["versions"]["harness"] == "mobile-export-host-harness 0.1.0"
    assert record["metrics"]["generated_tokens"] == 4 and record["metrics"]["decode_tokens_per_s"] > 10
    pushed = tmp_path / "phones" / SERIAL / "data" / "local" / "tmp" / "mobile-export" / "harness"
    assert pushed.read_text() == Path(harness_module.__file__).read_text()
    assert record["metrics"]["memory_source"] == "VmHWM (/proc/self/status)"
