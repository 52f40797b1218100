"""Running device tools: argument lists only (never a shell), a time limit, the whole child killed on it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass

from mobile_export.errors import UserError


@dataclass
class Completed:
    """What a tool did: exit status, output, and whether it ran out of time."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).strip()


def find_tool(name: str, install_hint: str) -> str:
    """Absolute path of a tool on PATH (or as given); a one-line error saying what to install."""
    found = shutil.which(name)
    if not found:
        raise UserError(f"'{name}' is not installed or not on PATH", hint=install_hint)
    return found


def run_tool(argv: list[str], timeout: float | None = None, env: dict[str, str] | None = None) -> Completed:
    """Run ``argv`` (a list; no shell) and capture its output; on timeout kill its process group."""
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise TypeError("argv must be a list of strings")
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group, so a timeout ends its children too
        env=None if env is None else {**os.environ, **env},
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        return Completed(argv, proc.returncode, stdout or "", stderr or "", timed_out=True)
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    return Completed(argv, proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this module started for ``proc`` (its id is the child's pid)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
