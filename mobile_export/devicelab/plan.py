"""Benchmark plans (``device_tests/plans/*.yaml``): bundles x devices x scenarios, and thresholds.

A plan is validated once, on load, by a strict schema; errors name the file, the line, the key
and what was expected. Relative paths in a plan are resolved against the current folder (plans
are run from the project root), so ``dist/demo-android`` means the same thing in every plan.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from mobile_export.errors import UserError

PLAN_SCHEMA_VERSION = 1
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- bundles ----------------------------------------------------------------------------------


class BundlePath(_Strict):
    """An existing bundle folder (written by ``mobile-export build``)."""

    path: str
    name: str | None = Field(default=None, pattern=_NAME)


class BundleRecipe(_Strict):
    """A recipe to build first (skipped when an identical bundle is already in ``build_dir``)."""

    recipe: str
    target: Literal["android", "ios"]
    backend: str | None = None
    quant: str | None = None
    group_size: int | None = None
    embedding_quant: str | None = None
    context_length: int | None = Field(default=None, ge=16)
    random_weights: bool = False
    seed: int = 0
    name: str | None = Field(default=None, pattern=_NAME)


def _bundle_kind(value) -> str | None:
    if isinstance(value, dict):
        if "path" in value:
            return "path"
        if "recipe" in value:
            return "recipe"
    return None


BundleSpec = Annotated[
    Annotated[BundlePath, Tag("path")] | Annotated[BundleRecipe, Tag("recipe")],
    Discriminator(
        _bundle_kind,
        custom_error_type="bundle_kind",
        custom_error_message="expected a mapping with 'path' (a bundle folder) or 'recipe' (a recipe to build first)",
    ),
]


# --- devices ----------------------------------------------------------------------------------


class HostDeviceSpec(_Strict):
    """This machine: ExecuTorch's Python runtime in a child process per measurement, or, with
    ``harness``, the native harness executable (``harness/README.md``) as a phone runs it."""

    kind: Literal["host"]
    name: str = Field(pattern=_NAME)
    harness: str | None = Field(
        default=None, min_length=1, description="a native harness executable to run instead of the Python harness"
    )


class AndroidDeviceSpec(_Strict):
    """A phone over adb, picked by serial; the on-phone harness is pushed from ``harness``."""

    kind: Literal["android"]
    name: str = Field(pattern=_NAME)
    serial: str = Field(min_length=1)
    harness: str = Field(min_length=1, description="local path of the harness executable to push")
    work_dir: str = Field(default="/data/local/tmp/mobile-export", pattern=r"^/")
    adb: str = "adb"


class IOSDeviceSpec(_Strict):
    """An iPhone/iPad over ``xcrun devicectl`` and ``xcodebuild test`` (the ios_demo XCTest harness)."""

    kind: Literal["ios"]
    name: str = Field(pattern=_NAME)
    udid: str = Field(min_length=1)
    project: str = Field(min_length=1, description="the .xcodeproj (or .xcworkspace) holding the harness test")
    scheme: str = "MobileExportBenchmark"
    test: str = "MobileExportBenchmarkTests/HarnessTests/testHarness"
    app_bundle_id: str = "org.mobile-export.demo"


class DeviceFarmDeviceSpec(_Strict):
    """A device pool in AWS Device Farm: the app and its test package run the harness there."""

    kind: Literal["devicefarm"]
    name: str = Field(pattern=_NAME)
    platform: Literal["android", "ios"]
    project_arn: str = Field(pattern=r"^arn:aws:devicefarm:")
    device_pool_arn: str = Field(pattern=r"^arn:aws:devicefarm:")
    app: str = Field(min_length=1, description="local .apk or .ipa")
    test_package: str = Field(min_length=1, description="local instrumentation .apk or XCTest .zip")
    test_spec: str | None = None
    region: str = "us-west-2"
    poll_interval_s: float = Field(default=30.0, gt=0)
    run_timeout_minutes: float = Field(default=90.0, gt=0)


DeviceSpec = Annotated[
    HostDeviceSpec | AndroidDeviceSpec | IOSDeviceSpec | DeviceFarmDeviceSpec, Field(discriminator="kind")
]
DEVICE_KINDS: dict[str, type[BaseModel]] = {
    "host": HostDeviceSpec,
    "android": AndroidDeviceSpec,
    "ios": IOSDeviceSpec,
    "devicefarm": DeviceFarmDeviceSpec,
}


# --- scenarios and thresholds -----------------------------------------------------------------


class Scenario(_Strict):
    """One workload: a prompt of ``prompt_tokens`` tokens, then exactly ``new_tokens`` generated."""

    name: str = Field(pattern=_NAME)
    prompt_tokens: int = Field(ge=1)
    new_tokens: int = Field(ge=1)
    warmup: int = Field(default=1, ge=0, description="untimed generations before the timed one")
    repetitions: int = Field(default=5, ge=1, le=1000)
    timeout_s: float = Field(default=300.0, gt=0, description="limit for one measurement")

    def fingerprint(self) -> str:
        """Short hash of the parameters that shape a measurement (resume keys use it)."""
        text = f"{self.prompt_tokens}/{self.new_tokens}/{self.warmup}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class RegressionThresholds(_Strict):
    """Allowed change against a baseline, in percent of the baseline median (null: not checked).

    Throughputs regress when they drop by more; times, memory and size when they grow by more.
    """

    load_s: float | None = Field(default=25.0, ge=0)
    ttft_s: float | None = Field(default=15.0, ge=0)
    prefill_tokens_per_s: float | None = Field(default=10.0, ge=0)
    decode_tokens_per_s: float | None = Field(default=10.0, ge=0)
    peak_memory_bytes: float | None = Field(default=10.0, ge=0)
    bundle_bytes: float | None = Field(default=2.0, ge=0)


# --- the plan ---------------------------------------------------------------------------------


class Plan(_Strict):
    """A whole benchmark plan."""

    schema_version: int = PLAN_SCHEMA_VERSION
    name: str = Field(pattern=_NAME)
    description: str = ""
    build_dir: str = "dist"
    bundles: list[BundleSpec] = Field(min_length=1)
    devices: list[DeviceSpec] = Field(min_length=1)
    scenarios: list[Scenario] = Field(min_length=1)
    thresholds: RegressionThresholds = Field(default_factory=RegressionThresholds)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value > PLAN_SCHEMA_VERSION:
            raise ValueError(f"plan schema {value} is newer than this mobile-export reads ({PLAN_SCHEMA_VERSION})")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> Plan:
        for section, names in (
            ("devices", [d.name for d in self.devices]),
            ("scenarios", [s.name for s in self.scenarios]),
        ):
            seen = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"{section}: name '{name}' is used twice")
                seen.add(name)
        return self

    def device(self, name: str):
        """A device by name; unknown names list the plan's devices."""
        for spec in self.devices:
            if spec.name == name:
                return spec
        known = ", ".join(d.name for d in self.devices)
        close = difflib.get_close_matches(name, [d.name for d in self.devices], n=1)
        hint = f"the plan's devices: {known}" + (f"; did you mean '{close[0]}'?" if close else "")
        raise UserError(f"unknown device '{name}'", hint=hint)


# --- loading ----------------------------------------------------------------------------------


def load_plan(path: Path) -> tuple[Plan, str]:
    """Parse and validate a plan file; returns the plan and the sha256 of its text."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"plan file {path} does not exist", hint="pass a plan such as device_tests/plans/smoke.yaml"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read plan {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"plan {path} is not UTF-8 text (byte {exc.start})", hint="save the plan as UTF-8") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise UserError(f"{path}:{where} is not valid YAML ({problem})", hint="fix the plan file") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of plan keys at the top level", hint="fix the plan file")
    data.setdefault("name", path.stem)
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}{_describe(exc, data, text)}", hint="fix the plan file") from exc
    return plan, hashlib.sha256(text.encode()).hexdigest()


def _describe(error: ValidationError, data: dict, text: str) -> str:
    """':line N: key 'a.b': what was expected (and N more)' for the first error."""
    first = error.errors()[0]
    loc = _clean_loc(first["loc"], data)
    key = ".".join(str(part) for part in loc) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key{_suggestion(loc, data)}"
    elif first["type"] == "missing":
        message = "required key is missing"
    line = _line_of(loc, text, first["type"] == "missing")
    extra = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    where = f":{line}" if line else ""
    return f"{where}: key '{key}': {message}{extra}"


def _clean_loc(loc: tuple, data) -> list:
    """The error location without pydantic's union tags (``devices.0.android.serial`` → ``devices.0.serial``)."""
    cleaned: list = []
    node = data
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(node, dict) and part in node:
            cleaned.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            cleaned.append(part)
            node = node[part]
        elif last or not isinstance(node, dict | list):
            cleaned.append(part)
    return cleaned


def _model_at(loc: list, data):
    """The schema class expected at ``loc[:-1]`` (for 'did you mean' on unknown keys)."""
    parent = loc[:-1]
    if not parent:
        return Plan
    section = parent[0]
    if section == "thresholds":
        return RegressionThresholds
    if section == "scenarios":
        return Scenario
    if section == "devices" and len(parent) == 2:
        item = data["devices"][parent[1]]
        return DEVICE_KINDS.get(item.get("kind")) if isinstance(item, dict) else None
    if section == "bundles" and len(parent) == 2:
        item = data["bundles"][parent[1]]
        return {"path": BundlePath, "recipe": BundleRecipe}.get(_bundle_kind(item))
    return None


def _suggestion(loc: list, data) -> str:
    model = _model_at(loc, data)
    if model is None or not loc:
        return ""
    fields = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return "; expected one of: " + ", ".join(fields)


def _line_of(loc: list, text: str, missing: bool) -> int | None:
    """1-based line of the YAML node at ``loc`` (its parent's line when the key is missing)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = node.start_mark.line + 1 if node is not None else None
    parts = loc[:-1] if missing else loc
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            match = next((pair for pair in node.value if pair[0].value == str(part)), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
