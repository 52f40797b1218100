"""Android transport against a TEST DOUBLE of the adb command line (tests/doubles/adb) — no phone.

The double emulates a phone's file system in a folder, runs pushed harness files when asked
through ``adb shell``, and logs every argument list, so these tests check the exact adb calls,
the shell quoting, and what the runner records for good runs, disconnects, timeouts, crashes and
malformed harness output. The harness on the "phone" is a test double of the on-device harness
(tests/doubles/fake_harness.py) that follows the results-file contract.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from doubles.lab import FAKE_HARNESS, SERIAL, adb_double, fake_bundle, read_jsonl, scenario, write_plan

from mobile_export.cli import main

WORK = "/data/local/tmp/mobile-export"


def android(serial: str = SERIAL, name: str = "pixel8", **extra) -> dict:
    return {"name": name, "kind": "android", "serial": serial, "harness": str(FAKE_HARNESS)} | extra


@pytest.fixture
def bundle(tmp_path) -> Path:
    return fake_bundle(tmp_path / "dist" / "tiny-android")


def bench(plan: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["bench", str(plan), "--out", str(out), *extra])


def harness_runs(state) -> list[list[str]]:
    """The adb calls that ran the harness (``adb -s S shell timeout ...``)."""
    return [argv for argv in state.argvs() if argv[2:4] == ["shell", "timeout"]]


def test_adb_double_happy_path_records_device_facts_and_exact_argv(tmp_path, monkeypatch, bundle):
    state = adb_double(tmp_path, monkeypatch)
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[android()],
        scenarios=[scenario(repetitions=2)],
    )
    result = bench(plan, tmp_path / "results", "--quiet")
    assert result.exit_code == 0, result.output
    records = read_jsonl(tmp_path / "results" / "results.jsonl")
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert [r["repetition"] for r in records] == [1, 2]
    record = records[0]
    device = record["device"]
    assert device["model"] == "Google Pixel 8" and device["os"] == "Android" and device["os_version"] == "14"
    assert device["soc"] == "Tensor G3" and device["abi"] == "arm64-v8a" and device["key"] == f"android:{SERIAL}"
    assert record["versions"]["adb"] == "1.0.41"
    assert record["versions"]["harness"] == "fake-harness (test double) 0"
    metrics = record["metrics"]
    assert metrics["prompt_tokens"] == 8 and metrics["generated_tokens"] == 4
    assert 1e6 < metrics["peak_memory_bytes"] < 4e9  # the double's own VmHWM, as the OS counted it
    assert metrics["decode_tokens_per_s"] > 0 and metrics["load_s"] >= 0

    argvs = state.argvs()
    tag = f"tiny-android-{record['bundle']['manifest_sha256'][:12]}"
    assert argvs[:2] == [["version"], ["devices"]]
    assert ["-s", SERIAL, "shell", "getprop", "ro.product.model"] in argvs
    assert ["-s", SERIAL, "shell", "getprop", "ro.soc.model"] in argvs
    assert ["-s", SERIAL, "push", str(FAKE_HARNESS), f"{WORK}/harness"] in argvs
    assert ["-s", SERIAL, "shell", "chmod", "755", f"{WORK}/harness"] in argvs
    assert ["-s", SERIAL, "push", str(bundle / "model.pte"), f"{WORK}/bundles/{tag}/model.pte"] in argvs
    assert ["-s", SERIAL, "push", str(bundle / "manifest.json"), f"{WORK}/bundles/{tag}/manifest.json"] in argvs
    prompt = tmp_path / "results" / "prompts" / tag / "prompt-8.json"
    assert ["-s", SERIAL, "push", str(prompt), f"{WORK}/prompts/{tag}/prompt-8.json"] in argvs
    out = f"{WORK}/results/tiny-android-short-1.json"
    assert harness_runs(state)[0] == [
        "-s", SERIAL, "shell", "timeout", "-s", "KILL", "30", f"{WORK}/harness",
        "--bundle", f"{WORK}/bundles/{tag}", "--prompt", f"{WORK}/prompts/{tag}/prompt-8.json",
        "--new-tokens", "4", "--warmup", "0", "--output", out,
    ]  # fmt: skip
    assert ["-s", SERIAL, "shell", "rm", "-f", out] in argvs
    assert argvs[argvs.index(harness_runs(state)[0]) + 1][:4] == ["-s", SERIAL, "pull", out]
    # the prompt pushed is the bundle tokenizer's encoding: 8 ids, BOS first
    ids = json.loads(prompt.read_text())["token_ids"]
    assert len(ids) == 8 and ids[0] == 0 and all(isinstance(i, int) for i in ids)


def test_adb_double_shell_words_are_quoted_so_paths_are_not_reinterpreted(tmp_path, monkeypatch, bundle):
    """A work folder with spaces and shell metacharacters arrives as one literal path on the phone."""
    state = adb_double(tmp_path, monkeypatch)
    work = "/data/local/tmp/lab run; touch pwned"
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[android(work_dir=work)],
        scenarios=[scenario(repetitions=1)],
    )
    result = bench(plan, tmp_path / "results", "--quiet")
    assert result.exit_code == 0, result.output
    assert read_jsonl(tmp_path / "results" / "results.jsonl")[0]["status"] == "ok"
    phone = tmp_path / "phones" / SERIAL / "data" / "local" / "tmp"
    assert (phone / "lab run; touch pwned" / "harness").is_file()
    assert not (phone / "pwned").exists() and not Path("pwned").exists()
    run = harness_runs(state)[0]
    assert run[7] == shlex.quote(f"{work}/harness")
    assert all(isinstance(word, str) for argv in state.argvs() for word in argv)


def test_adb_double_serial_not_connected_lists_connected_ones(tmp_path, monkeypatch, bundle):
    adb_double(tmp_path, monkeypatch, serials={"emulator-5554": "device", "0A1B2C": "unauthorized"})
    plan = write_plan(
        tmp_path / "plan.yaml", bundles=[{"path": str(bundle)}], devices=[android()], scenarios=[scenario()]
    )
    result = bench(plan, tmp_path / "results")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: android device 'pixel8': serial {SERIAL} is not connected")
    assert "connected: emulator-5554, 0A1B2C (unauthorized)" in line
    assert not (tmp_path / "results" / "results.jsonl").exists()


def test_adb_not_installed_says_what_to_install(tmp_path, monkeypatch, bundle):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    plan = write_plan(
        tmp_path / "plan.yaml", bundles=[{"path": str(bundle)}], devices=[android()], scenarios=[scenario()]
    )
    result = bench(plan, tmp_path / "results")
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "'adb' is not installed or not on PATH" in line
    assert "apt-get install android-sdk-platform-tools" in line


def test_adb_double_disconnect_mid_run_then_resume(tmp_path, monkeypatch, bundle):
    """Phone 1 is unplugged during its 2nd measurement: that one fails, its 3rd is skipped, phone 2
    still measures everything; after reconnecting, a rerun measures only phone 1's missing two."""
    state = adb_double(tmp_path, monkeypatch, serials={SERIAL: "device", "SECOND01": "device"})
    state.data["disconnect"] = {"serial": SERIAL, "after_runs": 1}
    state.save()
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[android(), android("SECOND01", "pixel7")],
        scenarios=[scenario(repetitions=3)],
    )
    out = tmp_path / "results"
    result = bench(plan, out, "--quiet")
    assert result.exit_code == 5, result.output
    records = read_jsonl(out / "results.jsonl")
    first = [(r["repetition"], r["status"]) for r in records if r["device"]["name"] == "pixel8"]
    assert first == [(1, "ok"), (2, "failed"), (3, "skipped")]
    failed = next(r for r in records if r["status"] == "failed")
    assert failed["failure"]["kind"] == "disconnected"
    assert f"device {SERIAL} disconnected" in failed["failure"]["reason"]
    assert "not found" in failed["failure"]["reason"]
    second = [(r["repetition"], r["status"]) for r in records if r["device"]["name"] == "pixel7"]
    assert second == [(1, "ok"), (2, "ok"), (3, "ok")]

    # reconnect the phone and rerun the same plan: only the two missing measurements run
    state.reload()
    state.data["devices"][SERIAL] = {"state": "device", "props": state.data["devices"]["SECOND01"]["props"]}
    state.data.pop("disconnect")
    state.save()
    runs_before = len(harness_runs(state))
    again = bench(plan, out, "--quiet")
    assert again.exit_code == 0, again.output
    new_runs = harness_runs(state)[runs_before:]
    assert [run[1] for run in new_runs] == [SERIAL, SERIAL]
    assert [run[-1].rsplit("-", 1)[1] for run in new_runs] == ["2.json", "3.json"]
    records = read_jsonl(out / "results.jsonl")
    assert len(records) == 8  # nothing rewritten: 6 from the first run, 2 appended
    ok = {(r["device"]["name"], r["repetition"]) for r in records if r["status"] == "ok"}
    assert ok == {(d, n) for d in ("pixel8", "pixel7") for n in (1, 2, 3)}


def test_adb_double_harness_timeout_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, bundle):
    adb_double(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_HARNESS_MODES", json.dumps({"2": "hang"}))
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[android()],
        scenarios=[scenario(repetitions=3, timeout_s=1)],
    )
    result = bench(plan, tmp_path / "results", "--quiet")
    assert result.exit_code == 5
    records = read_jsonl(tmp_path / "results" / "results.jsonl")
    assert [r["status"] for r in records] == ["ok", "timeout", "ok"]
    assert records[1]["failure"] == {
        "kind": "timeout",
        "reason": f"harness gave no result within 1s on {SERIAL}; killed",
    }
    assert records[1]["metrics"] is None


def test_adb_double_bad_harness_output_is_recorded_per_measurement(tmp_path, monkeypatch, bundle):
    adb_double(tmp_path, monkeypatch)
    modes = {"1": "garbage", "2": "missing", "3": "crash", "4": "failed", "5": "wrong-tokens"}
    monkeypatch.setenv("FAKE_HARNESS_MODES", json.dumps(modes))
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[android()],
        scenarios=[scenario(repetitions=6)],
    )
    result = bench(plan, tmp_path / "results", "--quiet")
    assert result.exit_code == 5
    records = read_jsonl(tmp_path / "results" / "results.jsonl")
    assert [r["status"] for r in records] == ["failed"] * 5 + ["ok"]
    reasons = [r["failure"]["reason"] for r in records[:5]]
    kinds = [r["failure"]["kind"] for r in records[:5]]
    assert kinds == ["bad_output", "bad_output", "crash", "harness_error", "bad_output"]
    assert reasons[0].startswith("harness results are not valid JSON") and "Segmentation fault" in reasons[0]
    assert reasons[1] == "harness results miss fields: ttft_s, decode_tokens_per_s, peak_memory_bytes"
    assert "wrote no results file" in reasons[2] and "fake harness: repetition 3, mode crash" in reasons[2]
    assert reasons[3] == "out of memory while loading model.pte"
    assert reasons[4] == "harness ran 8 prompt + 3 new tokens; the scenario asks for 8 + 4"


def test_adb_double_resume_after_interruption_with_a_torn_last_line(tmp_path, monkeypatch, bundle):
    """A run killed while writing record 2: the torn line is set aside, record 1 is kept, 2 and 3 are measured."""
    state = adb_double(tmp_path, monkeypatch)
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[android()],
        scenarios=[scenario(repetitions=3)],
    )
    out = tmp_path / "results"
    assert bench(plan, out, "--quiet").exit_code == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    kept = json.loads(lines[0])
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:57])  # interrupted mid-write
    runs_before = len(harness_runs(state))
    again = bench(plan, out)
    assert again.exit_code == 0, again.output
    assert "line 2 is not valid JSON (an interrupted write?); skipped" in again.output
    assert len(harness_runs(state)) - runs_before == 2
    text = (out / "results.jsonl").read_text()
    assert text.splitlines()[1] == lines[1][:57]  # the torn line is left as it was, on its own line
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{") and line.endswith("}")]
    assert records[0] == kept
    assert sorted(r["repetition"] for r in records) == [1, 2, 3]


def test_adb_double_failed_push_fails_that_bundle_and_the_run_goes_on(tmp_path, monkeypatch, bundle):
    state = adb_double(tmp_path, monkeypatch, serials={SERIAL: "device", "SECOND01": "device"})
    state.data["full_storage"] = True
    state.save()
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[android(), android("SECOND01", "pixel7")],
        scenarios=[scenario(repetitions=2)],
    )
    result = bench(plan, tmp_path / "results", "--quiet")
    assert result.exit_code == 5
    records = read_jsonl(tmp_path / "results" / "results.jsonl")
    assert [(r["device"]["name"], r["repetition"], r["status"]) for r in records] == [
        ("pixel8", 1, "failed"),
        ("pixel8", 2, "failed"),
        ("pixel7", 1, "failed"),
        ("pixel7", 2, "failed"),
    ]
    assert records[0]["failure"]["kind"] == "prepare"
    assert records[0]["failure"]["reason"].startswith("pushing ")
    assert "remote No space left on device" in records[0]["failure"]["reason"]
    assert harness_runs(state) == []
