"""Helpers for device-lab tests: put a TEST DOUBLE of adb/xcrun on PATH, hand-built bundles, plans.

The doubles (``adb``, ``xcrun``, ``fake_harness.py`` in this folder) stand in for tools and phones
this machine does not have; tests that use them say so in their names.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import yaml
from fake_bundles import make_manifest

from mobile_export.bundle import write_manifest
from mobile_export.sources import DEMO_TOKENIZER_DIR

DOUBLES = Path(__file__).resolve().parent
FAKE_HARNESS = DOUBLES / "fake_harness.py"
SERIAL = "R5CT90ABCDE"
UDID = "00008110-001A2B3C4D5E6F70"
ANDROID_PROPS = {
    "ro.product.manufacturer": "Google",
    "ro.product.model": "Pixel 8",
    "ro.build.version.release": "14",
    "ro.build.version.sdk": "34",
    "ro.soc.model": "Tensor G3",
    "ro.board.platform": "zuma",
    "ro.product.cpu.abi": "arm64-v8a",
}


def install_double(name: str, bin_dir: Path) -> Path:
    """Copy the named test double into ``bin_dir`` as an executable run by this interpreter."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    source = (DOUBLES / name).read_text(encoding="utf-8").split("\n", 1)[1]
    target = bin_dir / name
    target.write_text(f"#!{sys.executable} -S\n{source}", encoding="utf-8")  # -S: stdlib only, fast start
    target.chmod(0o755)
    return target


class DoubleState:
    """The JSON state file a double reads, and the argv log it writes."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data), encoding="utf-8")

    def reload(self) -> dict:
        self.data = json.loads(self.path.read_text(encoding="utf-8"))
        return self.data

    def calls(self) -> list[dict]:
        log = Path(self.data["log"])
        if not log.is_file():
            return []
        return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line]

    def argvs(self) -> list[list[str]]:
        return [call["argv"] for call in self.calls()]


def adb_double(tmp_path: Path, monkeypatch, serials: dict[str, str] | None = None) -> DoubleState:
    """The adb test double on PATH, with the given {serial: state} connected (default: one phone)."""
    bin_dir = tmp_path / "bin"
    install_double("adb", bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    devices = {
        serial: {"state": state, "props": ANDROID_PROPS} for serial, state in (serials or {SERIAL: "device"}).items()
    }
    state = DoubleState(
        tmp_path / "adb-state.json",
        {
            "root": str(tmp_path / "phones"),
            "log": str(tmp_path / "adb-calls.jsonl"),
            "python": sys.executable,
            "devices": devices,
        },
    )
    monkeypatch.setenv("ADB_DOUBLE_STATE", str(state.path))
    return state


def xcrun_double(tmp_path: Path, monkeypatch, harness: Path = FAKE_HARNESS) -> DoubleState:
    """The xcrun test double on PATH with one connected iPhone whose XCTest harness runs ``harness``."""
    bin_dir = tmp_path / "bin"
    install_double("xcrun", bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    device = {
        "udid": UDID,
        "name": "Lab iPhone",
        "marketingName": "iPhone 15 Pro",
        "productType": "iPhone16,1",
        "osVersionNumber": "18.1",
        "cpu": "arm64e",
    }
    state = DoubleState(
        tmp_path / "xcrun-state.json",
        {
            "root": str(tmp_path / "containers"),
            "log": str(tmp_path / "xcrun-calls.jsonl"),
            "python": sys.executable,
            "harness": str(harness),
            "devices": [device],
        },
    )
    monkeypatch.setenv("XCRUN_DOUBLE_STATE", str(state.path))
    return state


def fake_bundle(folder: Path, **manifest_fields) -> Path:
    """A hand-built bundle (not a real model) with the demo tokenizer and correct checksums."""
    folder.mkdir(parents=True)
    (folder / "model.pte").write_bytes(os.urandom(2048))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(DEMO_TOKENIZER_DIR / name, folder / name)
    write_manifest(folder, make_manifest(**manifest_fields))
    return folder


def write_plan(path: Path, *, bundles: list[dict], devices: list[dict], scenarios: list[dict], **extra) -> Path:
    """A plan YAML file."""
    data = {"name": "test-plan", "bundles": bundles, "devices": devices, "scenarios": scenarios, **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def scenario(name: str = "short", **fields) -> dict:
    """A small scenario (overridable fields)."""
    return {"name": name, "prompt_tokens": 8, "new_tokens": 4, "warmup": 0, "repetitions": 3, "timeout_s": 30} | fields


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a results file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def bench_record(rep: int, decode: float, **fields) -> dict:
    """One complete ``ok`` results record, as the runner writes them (fields replace top-level keys)."""
    record = {
        "schema": "mobile-export.bench",
        "schema_version": 1,
        "record_id": f"r{rep}",
        "run_id": "run1",
        "created_at": f"2026-01-01T00:00:0{rep}+00:00",
        "plan": {"name": "p", "sha256": "0" * 64, "thresholds": {"decode_tokens_per_s": 10}},
        "bundle": {"name": "demo-android", "path": "x", "manifest_sha256": "a" * 64, "bundle_bytes": 1000},
        "device": {"name": "pixel", "kind": "android", "key": "android:X1", "model": "Pixel 8", "os": "Android"},
        "scenario": {"fingerprint": "f", **scenario(warmup=0)},
        "repetition": rep,
        "versions": {"mobile_export": "0.1.0", "runtime": "executorch 1.5.1"},
        "status": "ok",
        "failure": None,
        "metrics": {
            "load_s": 0.05,
            "ttft_s": 0.02,
            "prefill_tokens_per_s": 400.0,
            "decode_tokens_per_s": decode,
            "peak_memory_bytes": 5_000_000,
            "memory_source": "VmHWM",
        },
        "parity": None,
    }
    return record | fields
