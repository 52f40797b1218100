"""Benchmark results: one JSON object per measurement, appended to ``results.jsonl`` as it is taken.

Schema (``schema_version`` 1; ``device_tests/RESULTS.md`` documents every field)::

    {"schema": "mobile-export.bench", "schema_version": 1, "record_id", "run_id", "created_at",
     "plan": {"name", "sha256", "thresholds"},
     "bundle": {"name", "path", "manifest_sha256", "model", "target", "backend", "quantization",
                "context_length", "bundle_bytes", "artifact_bytes"},
     "device": {"name", "kind", "key", "id", "model", "os", "os_version", "soc", ...},
     "scenario": {"name", "fingerprint", "prompt_tokens", "new_tokens", "warmup", "repetitions", "timeout_s"},
     "repetition": 1,
     "versions": {"mobile_export", "python", "runtime", "harness", <tool>: ...},
     "status": "ok" | "failed" | "timeout" | "skipped",
     "failure": null | {"kind", "reason"},
     "metrics": null | {"load_s", "ttft_s", "prefill_s", "decode_s", "prefill_tokens_per_s",
                        "decode_tokens_per_s", "prompt_tokens", "generated_tokens",
                        "peak_memory_bytes", "memory_source", "rss_before_load_bytes"},
     "parity": null | {"passed", "enforced", "prompts", "min_top1_agreement", "max_abs_logprob_diff",
                       "failures"}}

``parity`` (optional; absent in older records) is the harness's ``reference_outputs`` checked
against the bundle's ``reference.json``; a failed check makes the record ``failed`` (kind
``parity``, no metrics).

Every record is flushed and fsynced before the next measurement starts, so a crash or a pulled
cable never loses one already taken. A rerun skips measurements that already have an ``ok``
record (same bundle manifest, device, scenario parameters and repetition).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mobile_export.devicelab.record_shape import record_problem
from mobile_export.errors import UserError

RESULTS_SCHEMA = "mobile-export.bench"
RESULTS_SCHEMA_VERSION = 1
RESULTS_NAME = "results.jsonl"
STATUSES = ("ok", "failed", "timeout", "skipped")


def measurement_key(record: dict) -> tuple[str, str, str, str, int]:
    """What identifies one measurement across reruns."""
    return (
        record["bundle"]["manifest_sha256"],
        record["device"]["key"],
        record["scenario"]["name"],
        record["scenario"]["fingerprint"],
        int(record["repetition"]),
    )


@dataclass
class LoadedResults:
    """Records read from a results file, and the lines that could not be read."""

    path: Path
    records: list[dict] = field(default_factory=list)
    skipped_lines: list[str] = field(default_factory=list)


def results_path(folder_or_file: Path) -> Path:
    """``results.jsonl`` inside a folder, or the file itself."""
    return folder_or_file / RESULTS_NAME if folder_or_file.is_dir() else folder_or_file


def read_results(path: Path, *, must_exist: bool = True) -> LoadedResults:
    """Read every record; refuse records of a newer schema; report (and skip) unreadable lines."""
    loaded = LoadedResults(path)
    if not path.is_file():
        if must_exist:
            raise UserError(f"no results at {path}", hint="run 'mobile-export bench PLAN --out DIR' first")
        return loaded
    with path.open(encoding="utf-8", errors="replace") as handle:
        lines = handle.read().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            loaded.skipped_lines.append(f"{path} line {number} is not valid JSON (an interrupted write?); skipped")
            continue
        if not isinstance(record, dict) or record.get("schema") != RESULTS_SCHEMA:
            loaded.skipped_lines.append(f"{path} line {number} is not a mobile-export bench record; skipped")
            continue
        version = record.get("schema_version")
        if not isinstance(version, int):
            loaded.skipped_lines.append(f"{path} line {number} has no integer schema_version; skipped")
            continue
        if version > RESULTS_SCHEMA_VERSION:
            raise UserError(
                f"{path} line {number} uses results schema {version}; this mobile-export reads up to "
                f"{RESULTS_SCHEMA_VERSION}",
                hint="upgrade mobile-export",
            )
        problem = _shape_problem(record)
        if problem:
            loaded.skipped_lines.append(f"{path} line {number}: {problem}; skipped")
            continue
        loaded.records.append(record)
    return loaded


def _shape_problem(record: dict) -> str | None:
    for key in ("bundle", "device", "scenario", "repetition", "status"):
        if key not in record:
            return f"key '{key}' missing"
    if record["status"] not in STATUSES:
        return f"unknown status {record['status']!r}"
    try:
        measurement_key(record)
    except (KeyError, TypeError, ValueError) as exc:
        return f"incomplete record ({exc})"
    return record_problem(record)


def done_keys(records: Iterable[dict]) -> set[tuple]:
    """Keys of measurements that have an ``ok`` record."""
    return {measurement_key(r) for r in records if r["status"] == "ok"}


class ResultsLog:
    """Appends records to ``results.jsonl``: one line each, flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("a", encoding="utf-8")
        if path.stat().st_size and not _ends_with_newline(path):
            self._handle.write("\n")  # keep a torn last line (interrupted write) on a line of its own
        self.appended = 0

    def append(self, record: dict) -> None:
        """Write one record and make sure it reached the disk."""
        self._handle.write(json.dumps(record, sort_keys=False, separators=(",", ":")) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.appended += 1

    def close(self) -> None:
        """Close the file (records are already on disk)."""
        self._handle.close()

    def __enter__(self) -> ResultsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
