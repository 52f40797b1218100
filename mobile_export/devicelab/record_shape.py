"""The shape a results record must have for reports to read it: every field a report, a resume
or a baseline comparison uses, with its type. A line that does not fit is a malformed row
(reported and skipped), never a traceback in the report."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator

from mobile_export.errors import describe_validation_error

Number = StrictInt | StrictFloat
TEXT_METRICS = ("memory_source",)  # every other metric is a number (or null)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Bundle(_Open):
    name: StrictStr
    manifest_sha256: StrictStr
    bundle_bytes: Number | None = None


class _Device(_Open):
    name: StrictStr
    key: StrictStr
    model: StrictStr | None = None
    os: StrictStr | None = None
    os_version: StrictStr | None = None


class _Scenario(_Open):
    name: StrictStr
    fingerprint: StrictStr
    prompt_tokens: StrictInt
    new_tokens: StrictInt
    warmup: StrictInt = 0
    repetitions: StrictInt
    timeout_s: Number


class _Plan(_Open):
    name: StrictStr = "?"
    thresholds: dict[str, Number | None] = {}


class _Failure(_Open):
    kind: StrictStr | None = None
    reason: StrictStr | None = None


class RecordShape(_Open):
    """The fields of one ``results.jsonl`` record that readers rely on."""

    created_at: StrictStr = ""
    plan: _Plan | None = None
    bundle: _Bundle
    device: _Device
    scenario: _Scenario
    repetition: StrictInt
    versions: dict[str, StrictStr | None] = {}
    status: Literal["ok", "failed", "timeout", "skipped"]
    failure: _Failure | None = None
    metrics: dict[str, Number | StrictStr | None] | None = None

    @field_validator("metrics")
    @classmethod
    def _numbers(cls, value: dict | None) -> dict | None:
        for name, metric in (value or {}).items():
            text = name in TEXT_METRICS
            if metric is not None and (isinstance(metric, str) != text or (not text and not math.isfinite(metric))):
                raise ValueError(f"metric '{name}' is {metric!r}, not {'text' if text else 'a number'}")
        return value


def record_problem(record: dict) -> str | None:
    """Why ``record`` cannot be read by reports ("malformed row: ..."), or None."""
    try:
        shape = RecordShape.model_validate(record)
    except ValidationError as exc:
        return f"malformed row: {describe_validation_error(exc)}"
    if shape.status == "ok" and shape.metrics is None:
        return "ok record without metrics"
    return None
