"""Results files and reports: schema checks, medians and spread, baseline regressions, output formats.

Records here are made by the runner's own record builder from chosen metric values (the input
of a report), so every number the report shows can be checked against what went in.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from doubles.lab import fake_bundle

from mobile_export.cli import main
from mobile_export.devicelab.bundles import open_bench_bundle
from mobile_export.devicelab.devices import Device, DeviceInfo, Job, Outcome
from mobile_export.devicelab.harness import HarnessOutputError, parse_results
from mobile_export.devicelab.plan import Plan
from mobile_export.devicelab.results import ResultsLog, read_results
from mobile_export.devicelab.runner import _Context, make_record
from mobile_export.errors import UserError


class RecordedDevice(Device):
    """Stands for a device whose measurements are given (builds records; measures nothing)."""

    kind = "android"

    @property
    def key(self) -> str:
        return f"android:{self.spec.name}"

    def connect(self) -> DeviceInfo:
        raise AssertionError("not used")

    def measure(self, job, repetition):
        raise AssertionError("not used")


PLAN = Plan.model_validate(
    {
        "name": "weekly",
        "bundles": [{"path": "x"}],
        "devices": [{"name": "pixel8", "kind": "host"}],
        "scenarios": [{"name": "short", "prompt_tokens": 8, "new_tokens": 4, "repetitions": 3}],
        "thresholds": {"decode_tokens_per_s": 10, "peak_memory_bytes": 10, "ttft_s": 15},
    }
)


def metrics(decode: float, peak_mb: float = 500.0, ttft_ms: float = 20.0) -> dict:
    return {
        "load_s": 0.05,
        "ttft_s": ttft_ms / 1000,
        "prefill_s": ttft_ms / 1000,
        "decode_s": 3 / decode,
        "prefill_tokens_per_s": 8 / (ttft_ms / 1000),
        "decode_tokens_per_s": decode,
        "prompt_tokens": 8,
        "generated_tokens": 4,
        "peak_memory_bytes": int(peak_mb * 1e6),
        "memory_source": "VmHWM (/proc/self/status)",
        "rss_before_load_bytes": None,
    }


@pytest.fixture
def bundle(tmp_path):
    return open_bench_bundle(fake_bundle(tmp_path / "bundles" / "demo-android"))


def write_results(folder: Path, bundle, outcomes: list[Outcome], device_name: str = "pixel8") -> Path:
    device = RecordedDevice(type("Spec", (), {"name": device_name})())
    device.info = DeviceInfo(id="SER", model="Google Pixel 8", os="Android", os_version="14", soc="Tensor G3")
    context = _Context(PLAN, "0" * 64, "run1")
    job = Job(bundle, PLAN.scenarios[0], [o.repetition for o in outcomes])
    with ResultsLog(folder / "results.jsonl") as log:
        for outcome in outcomes:
            log.append(make_record(outcome, job, device, context))
    return folder


def ok(rep: int, decode: float, **kw) -> Outcome:
    return Outcome(rep, "ok", metrics=metrics(decode, **kw), runtime={"name": "executorch", "version": "1.5.1"})


def report(*args: str):
    return CliRunner().invoke(main, ["report", *map(str, args)])


def test_report_without_baseline_shows_medians_spread_and_failures(tmp_path, bundle):
    results = write_results(
        tmp_path / "now",
        bundle,
        [
            ok(1, 100.0, peak_mb=510),
            ok(2, 96.0, peak_mb=500),
            Outcome(3, "timeout", failure_kind="timeout", reason="no result within 30s"),
            ok(3, 104.0, peak_mb=505),  # the rerun of repetition 3 succeeded
        ],
    )
    result = report(results)
    assert result.exit_code == 0, result.output
    summary = json.loads((results / "summary.json").read_text())
    (group,) = summary["groups"]
    decode = group["metrics"]["decode_tokens_per_s"]
    assert decode["n"] == 3 and decode["median"] == 100.0 and (decode["min"], decode["max"]) == (96.0, 104.0)
    assert decode["values"] == [100.0, 96.0, 104.0] and decode["stdev"] == pytest.approx(4.0)
    assert group["runs"] == {"ok": 3, "failed": 0, "timeout": 0, "skipped": 0}  # the retry replaced the timeout
    assert group["metrics"]["peak_memory_bytes"]["median"] == 505e6
    markdown = (results / "report.md").read_text()
    assert "| demo-android | pixel8 (Google Pixel 8, Android 14) | 3/3 |" in markdown
    assert "100.0 (96.0–104.0)" in markdown and "505.0 (500.0–510.0)" in markdown
    assert "No baseline given" in markdown
    html = (results / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") == 5
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "100.0 (96.0–104.0)" in html


def test_failed_measurements_are_listed_with_reasons(tmp_path, bundle):
    results = write_results(
        tmp_path / "now",
        bundle,
        [ok(1, 100.0), Outcome(2, "failed", failure_kind="bad_output", reason="harness results miss fields: ttft_s")],
    )
    assert report(results).exit_code == 0
    markdown = (results / "report.md").read_text()
    assert "| demo-android | pixel8 | short | 2 | failed | harness results miss fields: ttft_s |" in markdown
    assert "1 ok, 1 failed" in markdown
    assert "harness results miss fields: ttft_s" in (results / "report.html").read_text()


def test_baseline_regression_is_marked_and_exits_non_zero(tmp_path, bundle):
    baseline = write_results(tmp_path / "last-week", bundle, [ok(1, 100.0), ok(2, 102.0), ok(3, 98.0)])
    current = write_results(
        tmp_path / "now", bundle, [ok(1, 80.0, peak_mb=520), ok(2, 82.0, peak_mb=520), ok(3, 78.0, peak_mb=520)]
    )
    result = report(current, "--baseline", baseline, "--pytorch-db", tmp_path / "db.json")
    assert result.exit_code == 4, result.output
    assert "REGRESSION demo-android on pixel8 (short): decode_tokens_per_s -20.0% (allowed 10%)" in result.stderr
    summary = json.loads((current / "summary.json").read_text())
    (regression,) = summary["regressions"]  # memory +4% and unchanged ttft are within their thresholds
    assert regression["metric"] == "decode_tokens_per_s"
    assert (regression["baseline"], regression["current"]) == (100.0, 80.0)
    assert regression["change_pct"] == pytest.approx(-20.0)
    changes = summary["groups"][0]["changes"]
    assert changes["peak_memory_bytes"]["change_pct"] == pytest.approx(4.0)
    assert not changes["peak_memory_bytes"]["regression"]
    markdown = (current / "report.md").read_text()
    assert "| demo-android | pixel8 | short | decode (tok/s) | 100.0 | 80.0 | -20.0% | -10% |" in markdown
    assert "80.0 (78.0–82.0) -20.0% **REGRESSION**" in markdown
    assert "520.0 +4.0%" in markdown
    html = (current / "report.html").read_text()
    assert "decode 100.0 → 80.0 tok/s (-20.0%, allowed 10%)" in html
    assert 'fill="#e0796f"' in html and "▼ regression" in html  # red bar and marked cell
    assert "stroke-dasharray" in html  # baseline tick drawn
    rows = json.loads((tmp_path / "db.json").read_text())
    token = next(r for r in rows if r["metric"]["name"] == "token_per_sec")
    assert token["metric"]["benchmark_values"] == [80.0, 82.0, 78.0]
    assert token["model"]["backend"] == "xnnpack" and token["benchmark"]["dtype"] == "8da4w"
    assert token["runners"][0]["name"] == "Google Pixel 8" and token["runners"][0]["type"] == "Android 14"
    assert {r["metric"]["name"] for r in rows} == {
        "model_load_time(ms)", "ttft(ms)", "prefill_token_per_sec", "token_per_sec", "peak_mem_usage(mb)",
    }  # fmt: skip


def test_threshold_override_and_improvements_are_not_regressions(tmp_path, bundle):
    baseline = write_results(tmp_path / "last-week", bundle, [ok(1, 100.0, ttft_ms=30)])
    current = write_results(tmp_path / "now", bundle, [ok(1, 85.0, ttft_ms=20)])
    assert report(current, "--baseline", baseline).exit_code == 4
    result = report(current, "--baseline", baseline, "--threshold", "decode_tokens_per_s=20")
    assert result.exit_code == 0, result.output
    summary = json.loads((current / "summary.json").read_text())
    assert summary["regressions"] == [] and summary["thresholds_pct"]["decode_tokens_per_s"] == 20
    assert summary["groups"][0]["changes"]["ttft_s"]["change_pct"] == pytest.approx(-100 / 3)
    assert "None beyond the thresholds." in (current / "report.md").read_text()
    bad = report(current, "--threshold", "speed=3")
    assert bad.exit_code == 2 and "unknown threshold metric 'speed'" in bad.stderr


def test_results_from_a_newer_schema_are_refused(tmp_path, bundle):
    results = write_results(tmp_path / "now", bundle, [ok(1, 100.0)])
    record = json.loads((results / "results.jsonl").read_text())
    record["schema_version"] = 2
    with (results / "results.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    result = report(results)
    assert result.exit_code == 2
    assert "results.jsonl line 2 uses results schema 2; this mobile-export reads up to 1 (upgrade mobile-export)" in (
        result.stderr
    )
    assert not (results / "report.md").exists()
    with pytest.raises(UserError):
        read_results(results / "results.jsonl")


def test_reports_are_written_atomically_and_replace_old_ones(tmp_path, bundle):
    results = write_results(tmp_path / "now", bundle, [ok(1, 100.0)])
    (results / "report.md").write_text("old")
    assert report(results).exit_code == 0
    assert (results / "report.md").read_text().startswith("# Benchmark report: weekly")
    assert sorted(p.name for p in results.iterdir()) == [
        "report.html", "report.md", "results.jsonl", "summary.json",
    ]  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    result = report(empty)
    assert result.exit_code == 2 and "no results at" in result.stderr


def test_harness_results_contract_checks():
    good = {
        "harness_schema_version": 1,
        "harness": {"name": "h", "version": "1"},
        "runtime": {"name": "executorch", "version": "1.5.1"},
        "status": "ok",
        "bundle_manifest_sha256": "a" * 64,
        **{k: v for k, v in metrics(50.0).items() if v is not None},
    }

    def check(data) -> dict:
        return parse_results(json.dumps(data), prompt_tokens=8, new_tokens=4, manifest_sha256="a" * 64)

    assert check(good)["decode_tokens_per_s"] == 50.0
    cases = {
        "harness results use schema 2": good | {"harness_schema_version": 2},
        "harness ran a different bundle": good | {"bundle_manifest_sha256": "b" * 64},
        "non-numeric or negative fields: load_s": good | {"load_s": "fast"},
        "harness status must be 'ok' or 'failed'": good | {"status": "done"},
        "harness results miss fields: harness": {k: v for k, v in good.items() if k != "harness"},
        "must be a JSON object, got list": [good],
    }
    for expected, data in cases.items():
        with pytest.raises(HarnessOutputError, match=expected.replace("(", r"\(")):
            check(data)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_html_report_renders_in_headless_chromium(tmp_path, bundle):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    baseline = write_results(tmp_path / "last-week", bundle, [ok(1, 100.0), ok(2, 102.0), ok(3, 98.0)])
    current = write_results(tmp_path / "now", bundle, [ok(1, 80.0), ok(2, 84.0), ok(3, 77.0)])
    assert report(current, "--baseline", baseline).exit_code == 4

    def screenshot(page: Path) -> Path:
        shot = page.with_suffix(".png")
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1400",
             f"--screenshot={shot}", page.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        assert _png_size(shot) == (1200, 1400)
        return shot

    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    shot = screenshot(current / "report.html")
    # a rendered page with text and charts compresses far worse than an empty one
    assert shot.stat().st_size > 5 * screenshot(blank).stat().st_size
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (current / "report.html").as_uri()],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert dom.count("<svg") == 5 and "regression" in dom and "80.0" in dom
