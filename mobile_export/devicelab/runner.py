"""Runs a plan: every bundle x device x scenario x repetition, each recorded as soon as it is taken.

Everything that can be checked before measuring is (plan, bundles and checksums, context
lengths, tools installed, phones connected), so bad input fails in seconds with one line. Once
measuring, a failure belongs to one measurement: a crashed, hung or garbled harness is recorded
as failed with its reason and the run goes on; a phone that disconnects fails the measurement
it was taking and the rest of its measurements are recorded as skipped. A rerun of the same plan
into the same folder skips every measurement that already has an ``ok`` record.
"""

from __future__ import annotations

import datetime as dt
import platform
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mobile_export import __version__
from mobile_export.errors import UserError

from .bundles import check_context, resolve_bundles, write_prompts
from .devices import Device, DeviceError, DeviceGone, Job, Outcome
from .devices.factory import make_device
from .plan import Plan, Scenario
from .progress import BenchProgress
from .results import RESULTS_NAME, RESULTS_SCHEMA, RESULTS_SCHEMA_VERSION, ResultsLog, done_keys, read_results


@dataclass
class RunSummary:
    """What a run did."""

    run_id: str
    results_path: Path
    records: list[dict] = field(default_factory=list)  # written by this run
    already_done: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def measured(self) -> int:
        return len(self.records)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.records if r["status"] != "ok")


@dataclass
class _Context:
    plan: Plan
    plan_sha256: str
    run_id: str


def run_plan(
    plan: Plan,
    plan_sha256: str,
    out_dir: Path,
    *,
    device_names: list[str] | None = None,
    progress: BenchProgress | None = None,
    build_ui=None,
    device_factory: Callable = make_device,
) -> RunSummary:
    """Measure the plan into ``out_dir/results.jsonl``; returns what this run recorded."""
    progress = progress or BenchProgress(quiet=True)
    path = out_dir / RESULTS_NAME
    existing = read_results(path, must_exist=False)  # refuses a newer schema before anything runs
    done = done_keys(existing.records)
    specs = [plan.device(name) for name in device_names] if device_names else list(plan.devices)
    bundles = resolve_bundles(plan, build_ui)
    for bundle in bundles:
        check_context(bundle, plan)
    devices: list[Device] = [device_factory(spec) for spec in specs]
    seen: dict[str, str] = {}
    for device in devices:
        if device.key in seen:
            raise UserError(
                f"plan devices '{seen[device.key]}' and '{device.name}' are the same device ({device.key})",
                hint="list each device once",
            )
        seen[device.key] = device.name
    summary = RunSummary(run_id=uuid.uuid4().hex[:12], results_path=path, problems=list(existing.skipped_lines))
    pending: dict[str, list[Job]] = {}
    for device in devices:
        for bundle in bundles:
            for scenario in plan.scenarios:
                reps = [
                    r
                    for r in range(1, scenario.repetitions + 1)
                    if (bundle.manifest_sha256, device.key, scenario.name, scenario.fingerprint(), r) not in done
                ]
                summary.already_done += scenario.repetitions - len(reps)
                if reps:
                    pending.setdefault(device.key, []).append(Job(bundle, scenario, reps))
    active = [d for d in devices if d.key in pending]
    if not active:
        return summary
    for bundle in bundles:
        lengths = {s.prompt_tokens for s in plan.scenarios}
        write_prompts(bundle, lengths, out_dir / "prompts" / f"{bundle.name}-{bundle.manifest_sha256[:12]}")
    context = _Context(plan, plan_sha256, summary.run_id)
    try:
        for device in active:
            progress.note(f"connecting {device.kind} device '{device.name}' ({device.key})")
            info = device.connect()
            progress.note(f"{device.name}: {info.model}, {info.os} {info.os_version}, {info.soc}")
        progress.start(sum(len(job.repetitions) for jobs in pending.values() for job in jobs))
        with ResultsLog(path) as log:
            for device in active:
                _run_device(device, pending[device.key], context, log, progress, summary)
    finally:
        progress.stop()
        for device in devices:
            device.close()
    return summary


def _run_device(
    device: Device, jobs: list[Job], context: _Context, log: ResultsLog, progress: BenchProgress, summary: RunSummary
) -> None:
    """All of one device's jobs; a disconnect ends the device's part of the run."""

    def record(outcome: Outcome, job: Job) -> None:
        entry = make_record(outcome, job, device, context)
        log.append(entry)
        summary.records.append(entry)
        progress.measured(entry)

    gone: str | None = None
    prepared: dict[str, str | None] = {}  # bundle name → preparation failure (None: ready)
    for job in jobs:
        if gone is None and job.bundle.name not in prepared:
            progress.note(f"{device.name}: preparing {job.bundle.name}")
            try:
                device.prepare(job.bundle)
                prepared[job.bundle.name] = None
            except DeviceGone as exc:
                gone = str(exc)
                first, *rest = job.repetitions
                record(Outcome(first, "failed", failure_kind="disconnected", reason=gone), job)
                for rep in rest:
                    record(Outcome(rep, "skipped", failure_kind="disconnected", reason=f"not run: {gone}"), job)
                continue
            except DeviceError as exc:
                prepared[job.bundle.name] = str(exc)
        if gone is not None:
            for rep in job.repetitions:
                record(Outcome(rep, "skipped", failure_kind="disconnected", reason=f"not run: {gone}"), job)
            continue
        if prepared[job.bundle.name] is not None:
            for rep in job.repetitions:
                record(Outcome(rep, "failed", failure_kind="prepare", reason=prepared[job.bundle.name]), job)
            continue
        remaining = list(job.repetitions)
        progress.measuring(device.name, job.bundle.name, job.scenario.name, remaining[0], job.scenario.repetitions)
        try:
            for outcome in device.run(job):
                if outcome.repetition in remaining:
                    remaining.remove(outcome.repetition)
                record(outcome, job)
                if remaining:
                    progress.measuring(
                        device.name, job.bundle.name, job.scenario.name, remaining[0], job.scenario.repetitions
                    )
        except DeviceGone as exc:
            gone = str(exc)
            first, *rest = remaining or [None]
            if first is not None:
                record(Outcome(first, "failed", failure_kind="disconnected", reason=gone), job)
            for rep in rest:
                record(Outcome(rep, "skipped", failure_kind="disconnected", reason=f"not run: {gone}"), job)
        except DeviceError as exc:
            for rep in remaining:
                record(Outcome(rep, "failed", failure_kind="device_error", reason=str(exc)), job)


def make_record(outcome: Outcome, job: Job, device: Device, context: _Context) -> dict:
    """The results record of one measurement (schema in :mod:`mobile_export.devicelab.results`)."""
    info = outcome.device or device.info
    device_part = {"name": device.name, "kind": device.kind, "key": device.key}
    device_part.update(info.as_record() if info else {"id": "unknown"})
    runtime = outcome.runtime or {}
    harness = outcome.harness or {}
    versions = {
        "mobile_export": __version__,
        "python": platform.python_version(),
        "runtime": " ".join(str(runtime[k]) for k in ("name", "version") if runtime.get(k)) or None,
        "harness": " ".join(str(harness[k]) for k in ("name", "version") if harness.get(k)) or None,
        **device.tool_versions(),
    }
    failure = None
    if outcome.status != "ok":
        failure = {"kind": outcome.failure_kind or "unknown", "reason": outcome.reason or "no reason given"}
    return {
        "schema": RESULTS_SCHEMA,
        "schema_version": RESULTS_SCHEMA_VERSION,
        "record_id": uuid.uuid4().hex,
        "run_id": context.run_id,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "plan": {
            "name": context.plan.name,
            "sha256": context.plan_sha256,
            "thresholds": context.plan.thresholds.model_dump(),
        },
        "bundle": job.bundle.describe(),
        "device": device_part,
        "scenario": _scenario_part(job.scenario),
        "repetition": outcome.repetition,
        "versions": versions,
        "status": outcome.status,
        "failure": failure,
        "metrics": outcome.metrics if outcome.status == "ok" else None,
        "parity": outcome.parity,
    }


def _scenario_part(scenario: Scenario) -> dict:
    data = scenario.model_dump()
    data["fingerprint"] = scenario.fingerprint()
    return data
