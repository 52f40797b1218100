#!/usr/bin/env python3
"""The benchmark harness contract, and the host harness that implements it.

Every harness (this one, the Android one, the iOS XCTest one) is invoked once per measurement::

    HARNESS --bundle DIR --prompt FILE --new-tokens N --warmup W --output FILE

It loads the bundle (timed: ``load_s``), runs ``W`` untimed generations, then one timed greedy
generation of exactly ``N`` new tokens after the prompt's token ids (EOS does not stop it), and
writes one JSON object to ``--output`` (atomically: a temporary file renamed into place). The
fields are in :data:`REQUIRED_OK_FIELDS`; ``device_tests/HARNESS.md`` documents them. When the
bundle has ``reference.json``, the harness also runs it (untimed, after the measurement) and adds
``reference_outputs``, which the runner checks (:func:`reference_parity`). Exit status
0 means a measurement was taken; non-zero means it was not (the results file, if written, then
has ``"status": "failed"`` and ``"error"``).

Run this host harness as ``python -m mobile_export.devicelab.harness ...``. Its peak memory is the
OS's high-water mark of resident memory (``VmHWM``) for its own process, reset when measurement
starts (Linux ``/proc/self/clear_refs``), so a process forked from a warm parent measures only
its own run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

from mobile_export import __version__

HARNESS_SCHEMA_VERSION = 1
HARNESS_NAME = "mobile-export-host-harness"
REQUIRED_FIELDS = ("harness_schema_version", "harness", "runtime", "status")
REQUIRED_OK_FIELDS = (
    "bundle_manifest_sha256",
    "prompt_tokens",
    "generated_tokens",
    "load_s",
    "ttft_s",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "peak_memory_bytes",
    "memory_source",
)
# The contract's other fields (device_tests/HARNESS.md): a results file has no keys beyond these.
OPTIONAL_FIELDS = ("error", "prefill_s", "decode_s", "rss_before_load_bytes", "device", "reference_outputs")
NUMERIC_OK_FIELDS = tuple(f for f in REQUIRED_OK_FIELDS if f not in ("bundle_manifest_sha256", "memory_source"))


class HarnessOutputError(ValueError):
    """A harness results file that does not follow the contract."""


def harness_argv(bundle: str, prompt: str, new_tokens: int, warmup: int, output: str) -> list[str]:
    """The contract's arguments (paths as the device sees them)."""
    return [
        "--bundle",
        bundle,
        "--prompt",
        prompt,
        "--new-tokens",
        str(new_tokens),
        "--warmup",
        str(warmup),
        "--output",
        output,
    ]


def parse_results(text: str, *, prompt_tokens: int, new_tokens: int, manifest_sha256: str) -> dict:
    """Validate a harness results file against the contract and the measurement asked for.

    Returns the parsed object (``status`` ``ok`` or ``failed``); raises :class:`HarnessOutputError`
    naming what is wrong.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        snippet = text[:60].replace("\n", " ")
        raise HarnessOutputError(
            f"harness results are not valid JSON ({exc.msg} at char {exc.pos}): {snippet!r}"
        ) from None
    if not isinstance(data, dict):
        raise HarnessOutputError(f"harness results must be a JSON object, got {type(data).__name__}")
    missing = [key for key in REQUIRED_FIELDS if key not in data]
    if missing:
        raise HarnessOutputError("harness results miss fields: " + ", ".join(missing))
    version = data["harness_schema_version"]
    if not isinstance(version, int) or version > HARNESS_SCHEMA_VERSION:
        raise HarnessOutputError(
            f"harness results use schema {version!r}; this mobile-export reads up to {HARNESS_SCHEMA_VERSION}"
        )
    if data["status"] not in ("ok", "failed"):
        raise HarnessOutputError(f"harness status must be 'ok' or 'failed', got {data['status']!r}")
    if data["status"] == "failed":
        data.setdefault("error", "harness reported a failure without a reason")
        return data
    missing = [key for key in REQUIRED_OK_FIELDS if data.get(key) is None]
    if missing:
        raise HarnessOutputError("harness results miss fields: " + ", ".join(missing))
    bad = [key for key in NUMERIC_OK_FIELDS if not _is_number(data[key]) or data[key] < 0]
    if bad:
        raise HarnessOutputError("harness results have non-numeric or negative fields: " + ", ".join(bad))
    if data["bundle_manifest_sha256"] != manifest_sha256:
        raise HarnessOutputError(
            f"harness ran a different bundle (manifest sha256 {str(data['bundle_manifest_sha256'])[:12]}…, "
            f"expected {manifest_sha256[:12]}…)"
        )
    if data["prompt_tokens"] != prompt_tokens or data["generated_tokens"] != new_tokens:
        raise HarnessOutputError(
            f"harness ran {data['prompt_tokens']} prompt + {data['generated_tokens']} new tokens; "
            f"the scenario asks for {prompt_tokens} + {new_tokens}"
        )
    return data


def reference_parity(bundle: Path, outputs) -> dict | None:
    """The results file's ``reference_outputs`` checked against the bundle's ``reference.json``
    (on the host, from the bundle the runner holds): a compact parity summary, or None when the
    bundle has no reference or the harness reported no outputs. Malformed outputs are a failed parity."""
    from mobile_export.errors import UserError
    from mobile_export.reference import REFERENCE_NAME, PromptOutput, check_outputs, read_reference

    if outputs is None or not (bundle / REFERENCE_NAME).is_file():
        return None
    reference = read_reference(bundle)
    try:
        parsed = [PromptOutput(tokens=[int(t) for t in o["tokens"]], logprobs=o.get("logprobs")) for o in outputs]
        report = check_outputs(reference, parsed)
    except (TypeError, KeyError, ValueError, AttributeError, UserError) as exc:
        reason = exc.one_line() if isinstance(exc, UserError) else f"malformed reference_outputs ({exc})"
        return {"passed": False, "enforced": True, "failures": [reason]}
    diffs = [p.max_abs_logprob_diff for p in report.prompts if p.max_abs_logprob_diff is not None]
    return {
        "passed": report.passed,
        "enforced": report.enforced,
        "prompts": len(report.prompts),
        "min_top1_agreement": min(p.top1_agreement for p in report.prompts),
        "max_abs_logprob_diff": max(diffs) if diffs else None,
        "failures": report.failures,
    }


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- the host harness -------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory() -> bool:
    """Reset this process's resident high-water mark (Linux); False where the OS cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_memory() -> tuple[int, str]:
    """This process's peak resident memory in bytes, as the OS counts it, and where it came from."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024, "VmHWM (/proc/self/status)"
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kilobytes elsewhere
    return maxrss * scale, "getrusage ru_maxrss"


def current_rss() -> int | None:
    """Resident memory now, in bytes (None where unknown)."""
    rss = _status_kb("VmRSS")
    return rss * 1024 if rss is not None else None


def runtime_version(name: str = "executorch") -> str:
    """Installed version of a runtime package, or 'unknown'."""
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def measure(bundle: Path, prompt_ids: list[int], new_tokens: int, warmup: int) -> dict:
    """Load ``bundle`` on this machine and time one generation; the contract's ok fields."""
    from mobile_export.bundle import MANIFEST_NAME, read_manifest
    from mobile_export.generate import generate
    from mobile_export.reference import REFERENCE_NAME, read_reference, run_reference
    from mobile_export.runtimes import open_bundle

    manifest = read_manifest(bundle)
    manifest_sha = hashlib.sha256((bundle / MANIFEST_NAME).read_bytes()).hexdigest()
    if len(prompt_ids) + new_tokens > manifest.context_length:
        raise ValueError(
            f"prompt {len(prompt_ids)} + {new_tokens} new tokens exceed the bundle's context of {manifest.context_length}"
        )
    reset = reset_peak_memory()
    before = current_rss()
    runtime = open_bundle(bundle, manifest)
    for _ in range(warmup):
        generate(runtime.step, prompt_ids, new_tokens, set(), manifest.context_length)
    stats = generate(runtime.step, prompt_ids, new_tokens, set(), manifest.context_length)
    peak, source = peak_memory()
    extra = {}
    if (bundle / REFERENCE_NAME).is_file():  # after the measurement: not timed, not in the peak
        outputs = run_reference(runtime, read_reference(bundle, manifest.vocab_size(), manifest.context_length))
        extra["reference_outputs"] = [{"tokens": o.tokens, "logprobs": o.logprobs} for o in outputs]
    return {
        "bundle_manifest_sha256": manifest_sha,
        "backend": manifest.backend,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "load_s": runtime.load_seconds,
        "ttft_s": stats.time_to_first_token,
        "prefill_s": stats.prefill_seconds,
        "decode_s": stats.decode_seconds,
        "prefill_tokens_per_s": stats.prefill_tokens_per_second,
        "decode_tokens_per_s": stats.decode_tokens_per_second,
        "peak_memory_bytes": peak,
        "memory_source": source + ("" if reset else ", not reset: includes the process's earlier peak"),
        "rss_before_load_bytes": before,
        **extra,
    }


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mobile_export.devicelab.harness", description="Time one generation of a bundle (host)."
    )
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--prompt", required=True, type=Path, help='JSON file {"token_ids": [...]}')
    parser.add_argument("--new-tokens", required=True, type=int)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--output", required=True, type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the host harness; returns the exit status (0: measured, 1: failed)."""
    args = _parser().parse_args(argv)
    result: dict = {
        "harness_schema_version": HARNESS_SCHEMA_VERSION,
        "harness": {"name": HARNESS_NAME, "version": __version__},
        "runtime": {"name": "executorch", "version": runtime_version()},
        "status": "ok",
        "error": None,
        "started_at": time.time(),
    }
    try:
        prompt = json.loads(args.prompt.read_text(encoding="utf-8"))["token_ids"]
        from mobile_export.runtimes.executorch import native_output_silenced

        with native_output_silenced((1,)):
            result.update(measure(args.bundle, [int(t) for t in prompt], args.new_tokens, args.warmup))
    except Exception as exc:  # the contract reports every failure in the results file
        message = exc.one_line() if hasattr(exc, "one_line") else f"{type(exc).__name__}: {exc}"
        result.update(status="failed", error=message)
    write_json_atomic(args.output, result)
    return 0 if result["status"] == "ok" else 1


def child_main(argv: list[str], log_path: str) -> None:
    """Entry point of a forked host measurement: output to ``log_path``, then :func:`main`."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process exits right after
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
