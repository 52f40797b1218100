"""Plans and other bad input to `bench`: one error line naming the file, line, key and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from doubles.lab import fake_bundle, scenario, write_plan

from mobile_export.cli import main
from mobile_export.devicelab.bundles import open_bench_bundle, prompt_ids
from mobile_export.devicelab.plan import AndroidDeviceSpec, BundlePath, BundleRecipe, HostDeviceSpec, load_plan
from mobile_export.errors import UserError

PLANS = Path(__file__).resolve().parent.parent / "device_tests" / "plans"
GOOD = """\
name: t
bundles:
  - path: dist/x
devices:
  - name: host
    kind: host
scenarios:
  - name: short
    prompt_tokens: 8
    new_tokens: 4
"""


def plan_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_plan(path)
    return caught.value.one_line()


def bench_error(*args: str) -> str:
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1
    return lines[-1]


def test_shipped_plans_validate():
    smoke, _ = load_plan(PLANS / "smoke.yaml")
    assert isinstance(smoke.bundles[0], BundleRecipe) and smoke.bundles[0].recipe == "demo"
    assert isinstance(smoke.devices[0], HostDeviceSpec)
    assert [s.name for s in smoke.scenarios] == ["short", "long-prompt"]
    example, _ = load_plan(PLANS / "android-example.yaml")
    assert isinstance(example.bundles[0], BundlePath)
    assert isinstance(example.devices[0], AndroidDeviceSpec) and example.devices[0].serial == "3A091FDJH00ABC"
    farm, _ = load_plan(PLANS / "devicefarm-example.yaml")
    assert farm.devices[0].kind == "devicefarm" and farm.devices[0].region == "us-west-2"


def test_defaults_and_plan_hash(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(GOOD)
    plan, sha = load_plan(path)
    s = plan.scenarios[0]
    assert (s.warmup, s.repetitions, s.timeout_s) == (1, 5, 300.0)
    assert plan.thresholds.decode_tokens_per_s == 10.0 and plan.build_dir == "dist"
    assert len(sha) == 64


def test_invalid_yaml_names_the_line(tmp_path):
    line = plan_error(tmp_path, GOOD.replace("  - name: short", "  - name: short: bad"))
    assert line.startswith(f"{tmp_path / 'plan.yaml'}: line 8 is not valid YAML")


def test_missing_key_names_file_line_and_key(tmp_path):
    text = GOOD.replace("    kind: host", "    kind: android")
    line = plan_error(tmp_path, text)
    assert line.startswith(f"{tmp_path / 'plan.yaml'}:5: key 'devices.0.serial': required key is missing")


def test_wrong_type_says_what_was_expected(tmp_path):
    line = plan_error(tmp_path, GOOD + "    repetitions: five\n")
    assert "plan.yaml:11: key 'scenarios.0.repetitions': Input should be a valid integer" in line


def test_out_of_range_value(tmp_path):
    line = plan_error(tmp_path, GOOD.replace("new_tokens: 4", "new_tokens: 0"))
    assert "plan.yaml:10: key 'scenarios.0.new_tokens': Input should be greater than or equal to 1" in line


def test_unknown_key_suggests_the_close_one(tmp_path):
    line = plan_error(tmp_path, GOOD + "    repetition: 3\n")
    assert "plan.yaml:11: key 'scenarios.0.repetition': unknown key; did you mean 'repetitions'?" in line


def test_unknown_device_kind_lists_the_kinds(tmp_path):
    line = plan_error(tmp_path, GOOD.replace("kind: host", "kind: androidd"))
    assert "key 'devices.0'" in line
    assert "'host', 'android', 'ios', 'devicefarm'" in line


def test_bundle_needs_path_or_recipe(tmp_path):
    line = plan_error(tmp_path, GOOD.replace("  - path: dist/x", "  - folder: dist/x"))
    assert "plan.yaml:3: key 'bundles.0': expected a mapping with 'path' (a bundle folder) or 'recipe'" in line


def test_duplicate_device_names(tmp_path):
    line = plan_error(tmp_path, GOOD.replace("devices:\n", "devices:\n  - name: host\n    kind: host\n"))
    assert "devices: name 'host' is used twice" in line


def test_newer_plan_schema_is_refused(tmp_path):
    line = plan_error(tmp_path, "schema_version: 2\n" + GOOD)
    assert "plan schema 2 is newer than this mobile-export reads (1)" in line


def test_missing_plan_file():
    assert bench_error("no/such/plan.yaml", "--out", "x").startswith(
        "error: plan file no/such/plan.yaml does not exist"
    )


def test_missing_bundle_is_refused_before_anything_runs(tmp_path):
    plan = write_plan(
        tmp_path / "p.yaml",
        bundles=[{"path": str(tmp_path / "nope")}],
        devices=[{"name": "host", "kind": "host"}],
        scenarios=[scenario()],
    )
    line = bench_error(str(plan), "--out", str(tmp_path / "out"))
    assert f"bundle {tmp_path / 'nope'} does not exist" in line
    assert not (tmp_path / "out").exists()


def test_checksum_mismatch_is_refused(tmp_path):
    bundle = fake_bundle(tmp_path / "b")
    (bundle / "model.pte").write_bytes(b"tampered")
    plan = write_plan(
        tmp_path / "p.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[{"name": "host", "kind": "host"}],
        scenarios=[scenario()],
    )
    line = bench_error(str(plan), "--out", str(tmp_path / "out"))
    assert f"bundle {bundle} failed its checksum check: model.pte: size 8 != 2048 in manifest" in line
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_scenario_longer_than_the_context_is_refused(tmp_path):
    bundle = fake_bundle(tmp_path / "b", context_length=64)
    plan = write_plan(
        tmp_path / "p.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[{"name": "host", "kind": "host"}],
        scenarios=[scenario(prompt_tokens=60, new_tokens=8)],
    )
    line = bench_error(str(plan), "--out", str(tmp_path / "out"))
    assert "scenario 'short' needs 68 tokens; bundle b holds 64" in line


def test_unknown_device_on_the_command_line(tmp_path):
    bundle = fake_bundle(tmp_path / "b")
    plan = write_plan(
        tmp_path / "p.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[{"name": "host", "kind": "host"}],
        scenarios=[scenario()],
    )
    line = bench_error(str(plan), "--out", str(tmp_path / "out"), "--device", "hots")
    assert line == "error: unknown device 'hots' (the plan's devices: host; did you mean 'host'?)"


def test_recipe_bundle_existing_with_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_bundle(tmp_path / "dist" / "demo-android", context_length=512)
    plan = write_plan(
        tmp_path / "p.yaml",
        bundles=[{"recipe": "demo", "target": "android", "context_length": 128}],
        devices=[{"name": "host", "kind": "host"}],
        scenarios=[scenario()],
    )
    line = bench_error(str(plan), "--out", "out")
    assert line.startswith(
        "error: dist/demo-android exists but was built with context length 512 (the plan asks for 128)"
    )


def test_prompt_ids_are_deterministic_and_exact(tmp_path):
    bundle = open_bench_bundle(fake_bundle(tmp_path / "b"))
    first = prompt_ids(bundle, 300)
    assert first == prompt_ids(bundle, 300) and len(first) == 300
    assert first[0] == 0 and 0 not in first[1:]  # BOS once, then text
    assert prompt_ids(bundle, 10) == first[:10]
    assert len(set(first)) > 50  # real text, not a repeated token
    assert all(type(i) is int for i in first)
    saved = json.loads(json.dumps({"token_ids": first}))["token_ids"]
    assert saved == first


def test_results_folder_from_a_newer_schema_is_refused_before_measuring(tmp_path):
    bundle = fake_bundle(tmp_path / "b")
    plan = write_plan(
        tmp_path / "p.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[{"name": "host", "kind": "host"}],
        scenarios=[scenario()],
    )
    out = tmp_path / "out"
    out.mkdir()
    newer = {"schema": "mobile-export.bench", "schema_version": 7}
    (out / "results.jsonl").write_text(json.dumps(newer) + "\n")
    line = bench_error(str(plan), "--out", str(out))
    assert line == (
        f"error: {out / 'results.jsonl'} line 1 uses results schema 7; this mobile-export reads up to 1 "
        "(upgrade mobile-export)"
    )
    assert (out / "results.jsonl").read_text() == json.dumps(newer) + "\n"  # left untouched


def test_the_same_device_twice_is_refused(tmp_path):
    bundle = fake_bundle(tmp_path / "b")
    plan = write_plan(
        tmp_path / "p.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[{"name": "host", "kind": "host"}, {"name": "laptop", "kind": "host"}],
        scenarios=[scenario()],
    )
    line = bench_error(str(plan), "--out", str(tmp_path / "out"))
    assert line.startswith("error: plan devices 'host' and 'laptop' are the same device (host:")


def test_a_host_device_with_a_native_harness_is_a_device_of_its_own():
    """The Python host harness and each native harness measure different processes: one plan may
    list them side by side (the runner refuses two entries with the same device key)."""
    from mobile_export.devicelab.devices.host import HostDevice

    python = HostDevice(HostDeviceSpec(kind="host", name="host"))
    native = HostDevice(HostDeviceSpec(kind="host", name="native", harness="harness/build/host/mobile-export-harness"))
    onnx = HostDevice(HostDeviceSpec(kind="host", name="native-onnx", harness="build/mobile-export-harness-onnx"))
    assert len({python.key, native.key, onnx.key}) == 3
    assert native.key == python.key + ":mobile-export-harness"
