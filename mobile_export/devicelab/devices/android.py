"""An Android phone over adb: pick it by serial, push bundle + harness, run, pull the results file.

Every adb call is an argument list (no local shell). ``adb shell`` joins its arguments into one
command line for the phone's shell, so each of them is quoted with :func:`shlex.quote` first. The
harness runs under the phone's ``timeout -s KILL`` so a hung harness dies on the phone too, not
only the local adb client. Peak memory is the harness process's ``VmHWM`` as the phone's kernel
counts it (see ``device_tests/HARNESS.md``).
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import tempfile
from pathlib import Path

from mobile_export.bundle import MANIFEST_NAME
from mobile_export.errors import UserError

from ..bundles import BenchBundle
from ..harness import harness_argv
from . import (
    Device,
    DeviceError,
    DeviceGone,
    DeviceInfo,
    Job,
    Outcome,
    checked,
    matching_line,
    no_results,
    outcome_from_results,
)
from ._proc import Completed, find_tool, run_tool

ADB_INSTALL_HINT = (
    "install Android SDK platform-tools: 'apt-get install android-sdk-platform-tools' on Debian/Ubuntu, "
    "or https://developer.android.com/tools/releases/platform-tools"
)
_GONE = re.compile(
    r"(?:^|\n)(?:adb: )?error: (?:device '[^']*' not found|no devices/emulators found|device offline|"
    r"device unauthorized|device still authorizing|closed|protocol fault)",
)
TOOL_TIMEOUT_S = 120.0  # pushes and pulls of large bundles take a while over USB 2
PROPS = {
    "manufacturer": "ro.product.manufacturer",
    "model": "ro.product.model",
    "os_version": "ro.build.version.release",
    "sdk": "ro.build.version.sdk",
    "soc": "ro.soc.model",
    "board": "ro.board.platform",
    "abi": "ro.product.cpu.abi",
}


def parse_devices(text: str) -> dict[str, str]:
    """``adb devices`` output → {serial: state}."""
    devices = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*")):
            continue
        parts = line.split()
        if len(parts) >= 2:
            devices[parts[0]] = parts[1]
    return devices


class AndroidDevice(Device):
    """A phone reached with adb."""

    kind = "android"

    def __init__(self, spec):
        super().__init__(spec)
        self.serial: str = spec.serial
        self.adb = spec.adb
        self.work_dir = spec.work_dir.rstrip("/")
        self.remote_harness = f"{self.work_dir}/harness"
        self._remote: dict[str, tuple[str, str]] = {}  # bundle name → (bundle dir, prompts dir)
        self._local = Path(tempfile.mkdtemp(prefix="mobile-export-adb-"))

    @property
    def key(self) -> str:
        return f"android:{self.serial}"

    # --- adb ---------------------------------------------------------------------------------

    def _adb(self, *args: str, timeout: float = TOOL_TIMEOUT_S) -> Completed:
        return run_tool([self.adb, "-s", self.serial, *args], timeout=timeout)

    def _shell(self, *words: str, timeout: float = TOOL_TIMEOUT_S) -> Completed:
        """``adb shell`` with every word quoted for the phone's shell."""
        return self._adb("shell", *[shlex.quote(word) for word in words], timeout=timeout)

    def _checked(self, result: Completed, what: str) -> Completed:
        """Raise DeviceGone on a disconnect, DeviceError on any other failure."""
        return checked(result, what, self.serial, _GONE, TOOL_TIMEOUT_S)

    # --- the interface -----------------------------------------------------------------------

    def connect(self) -> DeviceInfo:
        """adb present, the serial connected and authorized, facts read, harness pushed."""
        self.adb = find_tool(self.adb, ADB_INSTALL_HINT)
        version = run_tool([self.adb, "version"], timeout=30)
        adb_version = version.stdout.splitlines()[0].removeprefix("Android Debug Bridge version ").strip()
        listing = run_tool([self.adb, "devices"], timeout=30)
        if listing.returncode != 0:
            raise UserError(f"'adb devices' failed: {listing.output}", hint="restart the adb server: 'adb kill-server'")
        devices = parse_devices(listing.stdout)
        if devices.get(self.serial) != "device":
            ready = [s for s, state in devices.items() if state == "device"]
            others = [f"{s} ({state})" for s, state in devices.items() if state != "device"]
            state = f" ({devices[self.serial]})" if self.serial in devices else ""
            listed = ", ".join(ready + others) or "none"
            raise UserError(
                f"android device '{self.name}': serial {self.serial}{state} is not connected; connected: {listed}",
                hint="check the cable, accept the USB debugging prompt, or fix the plan's serial",
            )
        harness = Path(self.spec.harness)
        if not harness.is_file():
            raise UserError(
                f"android device '{self.name}': harness {harness} does not exist",
                hint="build the on-device harness (android_demo) or fix the plan's 'harness' path",
            )
        props = {}
        for key, prop in PROPS.items():
            result = self._shell("getprop", prop, timeout=30)
            if result.returncode != 0:
                self._as_user_error(result, "reading device properties")
            props[key] = result.stdout.strip()
        try:
            self._checked(self._shell("mkdir", "-p", f"{self.work_dir}/results"), "creating the work folder")
            self._checked(self._adb("push", str(harness), self.remote_harness), "pushing the harness")
            self._checked(self._shell("chmod", "755", self.remote_harness), "making the harness executable")
        except (DeviceGone, DeviceError) as exc:
            raise UserError(f"android device '{self.name}': {exc}") from exc
        model = " ".join(p for p in (props["manufacturer"], props["model"]) if p) or "unknown"
        self.info = DeviceInfo(
            id=self.serial,
            model=model,
            os="Android",
            os_version=props["os_version"] or "unknown",
            soc=props["soc"] or props["board"] or "unknown",
            extra={"sdk": props["sdk"], "abi": props["abi"], "board": props["board"]},
            tools={"adb": adb_version},
        )
        return self.info

    def _as_user_error(self, result: Completed, what: str) -> None:
        raise UserError(f"android device '{self.name}' ({self.serial}): {what} failed: {result.output}")

    def prepare(self, bundle: BenchBundle) -> None:
        """Push the bundle's files and its prompt files (one adb push per file)."""
        tag = f"{bundle.name}-{bundle.manifest_sha256[:12]}"
        remote_bundle = f"{self.work_dir}/bundles/{tag}"
        remote_prompts = f"{self.work_dir}/prompts/{tag}"
        files = [entry.path for entry in bundle.manifest.files] + [MANIFEST_NAME]
        folders = sorted({remote_bundle, remote_prompts} | {f"{remote_bundle}/{Path(p).parent}" for p in files})
        folders = [f for f in folders if not f.endswith("/.")]
        self._checked(self._shell("mkdir", "-p", *folders), f"creating {remote_bundle}")
        for rel in files:
            self._checked(self._adb("push", str(bundle.path / rel), f"{remote_bundle}/{rel}"), f"pushing {rel}")
        for length, local in sorted(bundle.prompts.items()):
            self._checked(self._adb("push", str(local), f"{remote_prompts}/prompt-{length}.json"), "pushing prompts")
        self._remote[bundle.name] = (remote_bundle, remote_prompts)

    def measure(self, job: Job, repetition: int) -> Outcome:
        """Run the harness once on the phone under a time limit and pull its results file."""
        remote_bundle, remote_prompts = self._remote[job.bundle.name]
        stem = f"{job.bundle.name}-{job.scenario.name}-{repetition}"
        remote_out = f"{self.work_dir}/results/{stem}.json"
        self._checked(self._shell("rm", "-f", remote_out), "removing an old results file")
        limit = max(1, math.ceil(job.scenario.timeout_s))
        argv = harness_argv(
            remote_bundle,
            f"{remote_prompts}/prompt-{job.scenario.prompt_tokens}.json",
            job.scenario.new_tokens,
            job.scenario.warmup,
            remote_out,
        )
        run = self._shell("timeout", "-s", "KILL", str(limit), self.remote_harness, *argv, timeout=limit + 30)
        if _GONE.search(run.output) and run.returncode != 0:
            raise DeviceGone(
                f"device {self.serial} disconnected while the harness ran: {matching_line(run.output, _GONE)}"
            )
        if run.timed_out or run.returncode in (124, 137):
            return Outcome(
                repetition,
                "timeout",
                failure_kind="timeout",
                reason=f"harness gave no result within {job.scenario.timeout_s:g}s on {self.serial}; killed",
            )
        local = self._local / f"{stem}.json"
        local.unlink(missing_ok=True)
        pulled = self._adb("pull", remote_out, str(local))
        if pulled.returncode != 0:
            if _GONE.search(pulled.output):
                raise DeviceGone(
                    f"device {self.serial} disconnected while pulling results: {matching_line(pulled.output, _GONE)}"
                )
            return no_results(
                f"harness exited with status {run.returncode} and wrote no results file", repetition, run.output
            )
        outcome = outcome_from_results(local.read_text(encoding="utf-8", errors="replace"), job, repetition)
        if outcome.status == "ok" and run.returncode != 0:
            return no_results(f"harness wrote results but exited with status {run.returncode}", repetition, run.output)
        return outcome

    def close(self) -> None:
        shutil.rmtree(self._local, ignore_errors=True)
