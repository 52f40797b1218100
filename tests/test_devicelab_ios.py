"""iOS transport against a TEST DOUBLE of the xcrun command line (tests/doubles/xcrun) — no Mac, no iPhone.

On this Linux machine the real transport refuses to start (first test). The rest force the
platform check to "darwin" so the transport's own logic runs against the double, which emulates
``devicectl`` device listing and file copies, ``xcodebuild build-for-testing`` /
``test-without-building`` (playing the ios_demo XCTest harness with a test double of the
on-device harness) and ``xcresulttool export attachments``, and logs every argument list.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from doubles.lab import UDID, fake_bundle, read_jsonl, scenario, write_plan, xcrun_double

from mobile_export.cli import main
from mobile_export.devicelab.devices.ios import IOSDevice
from mobile_export.devicelab.plan import load_plan
from mobile_export.devicelab.runner import run_plan
from mobile_export.errors import UserError


def ios(udid: str = UDID, **extra) -> dict:
    return {"name": "iphone15", "kind": "ios", "udid": udid, "project": "ios_demo/MobileExportDemo.xcodeproj"} | extra


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A fake bundle, a plan with one iOS device, the project folder the plan names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ios_demo" / "MobileExportDemo.xcodeproj").mkdir(parents=True)
    bundle = fake_bundle(tmp_path / "dist" / "tiny-ios", target="ios")
    plan = write_plan(
        tmp_path / "plan.yaml", bundles=[{"path": str(bundle)}], devices=[ios()], scenarios=[scenario(repetitions=2)]
    )
    return bundle, plan


def run_as_mac(plan: Path, out: Path):
    """run_plan with the iOS device's platform check forced to macOS (the transport under test)."""
    loaded, sha = load_plan(plan)
    return run_plan(loaded, sha, out, device_factory=lambda spec: IOSDevice(spec, platform="darwin"))


def test_ios_device_refused_off_macos_with_a_clear_error(setup, tmp_path):
    _, plan = setup
    result = CliRunner().invoke(main, ["bench", str(plan), "--out", str(tmp_path / "results")])
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ios device 'iphone15' needs macOS with Xcode (xcrun devicectl, xcodebuild)")
    assert f"this machine runs {sys.platform}" in line and "devicefarm" in line


def test_xcrun_double_happy_path_exact_argv_and_results_from_the_result_bundle(setup, tmp_path, monkeypatch):
    bundle, plan = setup
    state = xcrun_double(tmp_path, monkeypatch)
    summary = run_as_mac(plan, tmp_path / "results")
    assert [r["status"] for r in summary.records] == ["ok", "ok"]
    record = summary.records[0]
    assert record["device"]["model"] == "iPhone 15 Pro" and record["device"]["os_version"] == "18.1"
    assert record["device"]["soc"] == "arm64e" and record["device"]["key"] == f"ios:{UDID}"
    assert record["versions"]["xcode"] == "16.2"
    assert record["metrics"]["prompt_tokens"] == 8 and record["metrics"]["peak_memory_bytes"] > 1e6

    calls = state.calls()
    argvs = [c["argv"] for c in calls]
    assert argvs[0] == ["xcodebuild", "-version"]
    assert argvs[1][:4] == ["devicectl", "list", "devices", "--json-output"]
    project = ["-project", "ios_demo/MobileExportDemo.xcodeproj", "-scheme", "MobileExportBenchmark"]
    build = argvs[2]
    assert build[:6] == ["xcodebuild", "build-for-testing", *project]
    assert build[6:8] == ["-destination", f"id={UDID}"] and build[8] == "-derivedDataPath"
    tag = f"tiny-ios-{record['bundle']['manifest_sha256'][:12]}"
    copy = [
        "devicectl", "device", "copy", "to", "--device", UDID, "--domain-type", "appDataContainer",
        "--domain-identifier", "org.mobile-export.demo", "--source", str(bundle / "model.pte"),
        "--destination", f"Documents/mobile-export/bundles/{tag}/model.pte",
    ]  # fmt: skip
    assert copy in argvs
    tests = [c for c in calls if c["argv"][:2] == ["xcodebuild", "test-without-building"]]
    assert len(tests) == 2
    argv = tests[0]["argv"]
    assert argv[2:8] == [*project, "-destination", f"id={UDID}"]
    assert "-only-testing:MobileExportBenchmarkTests/HarnessTests/testHarness" in argv
    assert argv[-2] == "-resultBundlePath" and argv[-1].endswith("tiny-ios-short-1.xcresult")
    request = json.loads(tests[0]["env"]["TEST_RUNNER_MOBILE_EXPORT_HARNESS_ARGS"])
    assert request == {
        "argv": [
            "--bundle", f"Documents/mobile-export/bundles/{tag}",
            "--prompt", f"Documents/mobile-export/prompts/{tag}/prompt-8.json",
            "--new-tokens", "4", "--warmup", "0",
            "--output", "Documents/mobile-export/results/tiny-ios-short-1.json",
        ],
        "timeout_s": 30.0,
    }  # fmt: skip
    exports = [a for a in argvs if a[:3] == ["xcresulttool", "export", "attachments"]]
    assert len(exports) == 2 and exports[0][3:5] == ["--path", argv[-1]]


def test_xcrun_double_udid_not_connected_lists_devices(setup, tmp_path, monkeypatch):
    _, plan = setup
    xcrun_double(tmp_path, monkeypatch)
    plan.write_text(plan.read_text().replace(UDID, "00008030-000000000000BEEF"))
    with pytest.raises(UserError) as caught:
        run_as_mac(plan, tmp_path / "results")
    message = caught.value.one_line()
    assert "udid 00008030-000000000000BEEF is not connected" in message
    assert f"connected: Lab iPhone ({UDID})" in message


def test_xcrun_not_installed_says_install_xcode(setup, tmp_path, monkeypatch):
    _, plan = setup
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(UserError) as caught:
        run_as_mac(plan, tmp_path / "results")
    assert "'xcrun' is not installed or not on PATH" in caught.value.one_line()
    assert "install Xcode 15 or newer" in caught.value.one_line()


def test_xcrun_double_disconnect_and_garbage_output_are_recorded(setup, tmp_path, monkeypatch):
    _, plan = setup
    plan.write_text(plan.read_text().replace("repetitions: 2", "repetitions: 4"))
    state = xcrun_double(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_HARNESS_MODES", json.dumps({"2": "garbage"}))
    # devicectl/xcodebuild calls: list, build-for-testing, 6 copies (4 bundle files, manifest, prompt),
    # then one per measurement: the device is gone from the 3rd measurement on
    state.data["disconnect"] = {"udid": UDID, "after_calls": 1 + 1 + 6 + 2}
    state.save()
    summary = run_as_mac(plan, tmp_path / "results")
    statuses = [(r["repetition"], r["status"], (r["failure"] or {}).get("kind")) for r in summary.records]
    assert statuses == [
        (1, "ok", None),
        (2, "failed", "bad_output"),
        (3, "failed", "disconnected"),
        (4, "skipped", "disconnected"),
    ]
    assert "not valid JSON" in summary.records[1]["failure"]["reason"]
    assert "Unable to find a destination" in summary.records[2]["failure"]["reason"]
    assert read_jsonl(tmp_path / "results" / "results.jsonl") == summary.records
