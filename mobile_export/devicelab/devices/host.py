"""The host: the bundle runs in a child process on this machine.

By default each measurement is its own process forked from a server that has already imported
PyTorch and ExecuTorch (importing them takes seconds and is not what a phone would pay), running
the Python harness, so every repetition loads the bundle cold and its peak resident memory is
that process's own, as the OS counts it (the interpreter and PyTorch included). With the
device's ``harness`` set, each measurement runs that native executable instead (``harness/``:
the program a phone runs, no Python in the process). A measurement past the scenario's
``timeout_s`` is killed and recorded as a timeout.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import shutil
import socket
import tempfile
import time
from pathlib import Path

from mobile_export.errors import UserError

from ..harness import child_main, harness_argv, runtime_version
from . import Device, DeviceInfo, Job, Outcome, no_results, outcome_from_results, read_results_file
from ._proc import run_tool

PRELOAD_MODULE = "mobile_export.devicelab.host_preload"


def _noop() -> None:
    """Target of the process that starts the fork server."""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class HostDevice(Device):
    """This machine, through the host harness (:mod:`mobile_export.devicelab.harness`)."""

    kind = "host"

    def __init__(self, spec):
        super().__init__(spec)
        self._context = None
        self._native: Path | None = None
        self._workdir: Path | None = None

    @property
    def key(self) -> str:
        # a native harness measures another process than the Python one: a device key of its own
        native = self.spec.harness
        return f"host:{socket.gethostname()}" + (f":{Path(native).name}" if native else "")

    def connect(self) -> DeviceInfo:
        """Start the fork server (imports the runtime once), or check the native harness is an
        executable; read the machine's facts."""
        import psutil

        native = self.spec.harness
        if native is not None:
            path = Path(native).expanduser()
            if not path.is_file() or not os.access(path, os.X_OK):
                raise UserError(
                    f"device '{self.spec.name}': native harness {path} is not an executable file",
                    hint="build it (harness/README.md: cmake -S harness -B harness/build/host), or leave out 'harness'",
                )
            self._native = path.resolve()
        else:
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload([PRELOAD_MODULE])
            starter = self._context.Process(target=_noop)
            starter.start()
            starter.join()
        self._workdir = Path(tempfile.mkdtemp(prefix="mobile-export-host-"))
        self.info = DeviceInfo(
            id=socket.gethostname(),
            model=_cpu_model(),
            os=platform.system(),
            os_version=platform.release(),
            soc=platform.machine(),
            extra={"cpu_count": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total},
            tools={"python": platform.python_version()} if native is None else {"native_harness": str(self._native)},
        )
        return self.info

    def measure(self, job: Job, repetition: int) -> Outcome:
        """Fork one measurement process (or run the native harness), wait up to the scenario's
        timeout, read its results file."""
        assert (self._context or self._native) is not None and self._workdir is not None, "connect() first"
        stem = f"{job.bundle.name}-{job.scenario.name}-{repetition}"
        output = self._workdir / f"{stem}.json"
        log = self._workdir / f"{stem}.log"
        output.unlink(missing_ok=True)
        argv = harness_argv(
            str(job.bundle.path.resolve()),
            str(job.bundle.prompts[job.scenario.prompt_tokens].resolve()),
            job.scenario.new_tokens,
            job.scenario.warmup,
            str(output),
        )
        started = time.monotonic()
        if self._native is not None:
            exitcode, timed_out, log_text = self._run_native(argv, job.scenario.timeout_s)
            runtime = {}  # the results file names it; no file, no claim
        else:
            exitcode, timed_out, log_text = self._run_forked(argv, log, job.scenario.timeout_s)
            runtime = {"name": "executorch", "version": runtime_version()}
        if timed_out:
            return Outcome(
                repetition,
                "timeout",
                failure_kind="timeout",
                reason=f"no result within {job.scenario.timeout_s:g}s; the measurement process was killed",
                runtime=runtime,
            )
        elapsed = time.monotonic() - started
        text = read_results_file(output)
        if text is None:
            return no_results(f"harness exited with status {exitcode} after {elapsed:.1f}s", repetition, log_text)
        outcome = outcome_from_results(text, job, repetition)
        if outcome.status == "ok" and exitcode != 0:
            return no_results(f"harness wrote results but exited with status {exitcode}", repetition, log_text)
        return outcome

    def _run_forked(self, argv: list[str], log: Path, timeout_s: float) -> tuple[int | None, bool, str]:
        """The Python harness in a process forked from the server: (exit status, timed out, log)."""
        process = self._context.Process(target=child_main, args=(argv, str(log)), daemon=True)
        process.start()
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join()
            return process.exitcode, True, ""
        return process.exitcode, False, read_results_file(log) or ""

    def _run_native(self, argv: list[str], timeout_s: float) -> tuple[int, bool, str]:
        """The native harness executable (an argument list, its own process group)."""
        done = run_tool([str(self._native), *argv], timeout=timeout_s)
        return done.returncode, done.timed_out, done.output

    def close(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
