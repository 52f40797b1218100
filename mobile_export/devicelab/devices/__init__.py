"""Devices: one small interface, one module per way of reaching a phone.

A device is ``connect``-ed once (tools installed, phone present: a :class:`UserError` otherwise),
``prepare``-d once per bundle (copy the bundle, prompts and harness over), then asked for
measurements. ``run`` yields one :class:`Outcome` per repetition as each is taken; a device
where a run is expensive (a cloud lab) overrides it to take them all in one go.

This module is the interface and the helpers every device module shares; it imports none of
them. :func:`mobile_export.devicelab.devices.factory.make_device` picks one by a plan's kind.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..bundles import BenchBundle
from ..harness import HarnessOutputError, parse_results, reference_parity
from ..plan import Scenario


@dataclass
class DeviceInfo:
    """Facts about the physical device, recorded with every measurement."""

    id: str
    model: str = "unknown"
    os: str = "unknown"
    os_version: str = "unknown"
    soc: str = "unknown"
    extra: dict = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)

    def as_record(self) -> dict:
        data = asdict(self)
        data.update(data.pop("extra"))
        data.pop("tools")
        return data


@dataclass
class Outcome:
    """One measurement as the device reported it."""

    repetition: int
    status: str  # ok | failed | timeout
    metrics: dict | None = None
    failure_kind: str | None = None
    reason: str | None = None
    harness: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    device: DeviceInfo | None = None  # set when one plan device stands for several phones
    parity: dict | None = None  # the harness's reference outputs checked against reference.json


@dataclass
class Job:
    """One bundle x scenario on a device, with the repetitions still to measure (1-based)."""

    bundle: BenchBundle
    scenario: Scenario
    repetitions: list[int]


class DeviceGone(Exception):
    """The device disconnected: this measurement failed and the device takes no more."""


class DeviceError(Exception):
    """Preparing the device for a bundle failed (e.g. a push); that bundle's measurements fail."""


class Device(ABC):
    """A way to run the benchmark harness on one device."""

    kind: str = ""

    def __init__(self, spec):
        self.spec = spec
        self.name: str = spec.name
        self.info: DeviceInfo | None = None

    @property
    @abstractmethod
    def key(self) -> str:
        """Stable identity for resuming (kind and serial/udid/pool), known before connecting."""

    @abstractmethod
    def connect(self) -> DeviceInfo:
        """Check tools and presence, read device facts; :class:`UserError` when unusable."""

    def prepare(self, bundle: BenchBundle) -> None:  # noqa: B027 - optional hook
        """Copy what the harness needs for ``bundle`` onto the device."""

    @abstractmethod
    def measure(self, job: Job, repetition: int) -> Outcome:
        """Take one measurement."""

    def run(self, job: Job) -> Iterator[Outcome]:
        """Take the job's measurements, yielding each as soon as it is taken."""
        for repetition in job.repetitions:
            yield self.measure(job, repetition)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what ``connect`` set up."""

    def tool_versions(self) -> dict[str, str]:
        """Versions of the tools used to reach the device (adb, Xcode, boto3)."""
        return dict(self.info.tools) if self.info else {}


def outcome_from_results(text: str, job: Job, repetition: int) -> Outcome:
    """An outcome from a harness results file, checked against the contract and the job."""
    try:
        data = parse_results(
            text,
            prompt_tokens=job.scenario.prompt_tokens,
            new_tokens=job.scenario.new_tokens,
            manifest_sha256=job.bundle.manifest_sha256,
        )
    except HarnessOutputError as exc:
        return Outcome(repetition, "failed", failure_kind="bad_output", reason=str(exc))
    harness = data.get("harness") if isinstance(data.get("harness"), dict) else {"name": str(data.get("harness"))}
    runtime = data.get("runtime") if isinstance(data.get("runtime"), dict) else {"name": str(data.get("runtime"))}
    if data["status"] != "ok":
        return Outcome(
            repetition,
            "failed",
            failure_kind="harness_error",
            reason=str(data.get("error")),
            harness=harness,
            runtime=runtime,
        )
    metrics = {
        key: data.get(key)
        for key in (
            "load_s",
            "ttft_s",
            "prefill_s",
            "decode_s",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "prompt_tokens",
            "generated_tokens",
            "peak_memory_bytes",
            "memory_source",
            "rss_before_load_bytes",
        )
    }
    parity = reference_parity(job.bundle.path, data.get("reference_outputs"))
    if parity is not None and parity["enforced"] and not parity["passed"]:
        return Outcome(
            repetition,
            "failed",
            failure_kind="parity",
            reason=f"output does not match reference.json: {parity['failures'][0]}",
            harness=harness,
            runtime=runtime,
            parity=parity,
        )
    return Outcome(repetition, "ok", metrics=metrics, harness=harness, runtime=runtime, parity=parity)


def read_results_file(path: Path) -> str | None:
    """The text of a pulled results file, or None when there is none."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def no_results(reason: str, repetition: int, log: str = "") -> Outcome:
    """A measurement whose harness left no results file."""
    tail = " ".join(log.strip().splitlines()[-3:])[-300:]
    return Outcome(repetition, "failed", failure_kind="crash", reason=reason + (f"; output: {tail}" if tail else ""))


def matching_line(text: str, pattern) -> str:
    """The first line of ``text`` that ``pattern`` matches (else its last line): the reason to show."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return next((line for line in lines if pattern.search(line)), lines[-1] if lines else "")


def checked(result, what: str, device: str, gone, timeout_s: float | None = None):
    """``result`` if the tool succeeded; DeviceGone when its output says the device disconnected,
    DeviceError otherwise (naming the time limit when ``timeout_s`` is given and it ran out)."""
    if result.returncode == 0 and not result.timed_out:
        return result
    message = matching_line(result.output, gone) or f"exit status {result.returncode}"
    if gone.search(result.output):
        raise DeviceGone(f"device {device} disconnected during {what}: {message}")
    if result.timed_out and timeout_s is not None:
        raise DeviceError(f"{what} did not finish within {timeout_s:g}s")
    raise DeviceError(f"{what} failed: {message}")


def dumps(data: dict) -> str:
    """Compact JSON (for arguments passed through environment variables)."""
    return json.dumps(data, separators=(",", ":"))
