"""An iPhone or iPad over ``xcrun devicectl`` and ``xcodebuild``, with the ios_demo XCTest harness.

connect   ``xcrun devicectl list devices --json-output F`` (the udid must be there), then
          ``xcrun xcodebuild build-for-testing`` of the harness scheme once.
prepare   ``xcrun devicectl device copy to`` each bundle file and prompt file into the harness app's
          data container (``Documents/mobile-export/...``).
measure   ``xcrun xcodebuild test-without-building -only-testing:<test>`` with the harness arguments in
          ``TEST_RUNNER_MOBILE_EXPORT_HARNESS_ARGS`` (xcodebuild hands ``TEST_RUNNER_*`` variables to the
          test without the prefix); the test attaches its results file as
          ``mobile-export-results.json``, read back with ``xcrun xcresulttool export attachments``.

Every call is an argument list. Only macOS has these tools: elsewhere connecting says so.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from mobile_export.bundle import MANIFEST_NAME
from mobile_export.errors import UserError

from ..bundles import BenchBundle
from ..harness import harness_argv
from . import (
    Device,
    DeviceGone,
    DeviceInfo,
    Job,
    Outcome,
    checked,
    dumps,
    matching_line,
    no_results,
    outcome_from_results,
)
from ._proc import Completed, find_tool, run_tool

XCRUN_INSTALL_HINT = "install Xcode 15 or newer, then 'sudo xcode-select -s /Applications/Xcode.app'"
ARGS_VARIABLE = "TEST_RUNNER_MOBILE_EXPORT_HARNESS_ARGS"
ATTACHMENT_NAME = "mobile-export-results.json"
REMOTE_ROOT = "Documents/mobile-export"
LAUNCH_GRACE_S = 180.0  # installing and launching the test runner before the harness starts
_GONE = re.compile(
    r"Unable to find a destination matching|device (?:is )?not (?:connected|found)|"
    r"DeviceNotAvailable|device was disconnected|Lost connection to the test manager",
    re.IGNORECASE,
)


class IOSDevice(Device):
    """A device reached with Xcode's command-line tools."""

    kind = "ios"

    def __init__(self, spec, platform: str | None = None):
        super().__init__(spec)
        self.udid: str = spec.udid
        self.platform = platform or sys.platform
        self.xcrun = "xcrun"
        self._local = Path(tempfile.mkdtemp(prefix="mobile-export-ios-"))
        self._derived = self._local / "DerivedData"
        self._remote: dict[str, tuple[str, str]] = {}

    @property
    def key(self) -> str:
        return f"ios:{self.udid}"

    def _xcrun(self, *args: str, timeout: float | None = 300, env: dict[str, str] | None = None) -> Completed:
        return run_tool([self.xcrun, *args], timeout=timeout, env=env)

    def _project_args(self) -> list[str]:
        flag = "-workspace" if self.spec.project.endswith(".xcworkspace") else "-project"
        return [
            flag,
            self.spec.project,
            "-scheme",
            self.spec.scheme,
            "-destination",
            f"id={self.udid}",
            "-derivedDataPath",
            str(self._derived),
        ]

    def _checked(self, result: Completed, what: str) -> Completed:
        return checked(result, what, self.udid, _GONE)

    def connect(self) -> DeviceInfo:
        """macOS and Xcode present, the udid connected, the harness built for testing."""
        if self.platform != "darwin":
            raise UserError(
                f"ios device '{self.name}' needs macOS with Xcode (xcrun devicectl, xcodebuild); "
                f"this machine runs {self.platform}",
                hint="run this plan on a Mac, or reach iPhones through a 'devicefarm' device with platform: ios",
            )
        self.xcrun = find_tool("xcrun", XCRUN_INSTALL_HINT)
        version = self._xcrun("xcodebuild", "-version", timeout=60)
        if version.returncode != 0:
            raise UserError(f"'xcrun xcodebuild -version' failed: {version.output}", hint=XCRUN_INSTALL_HINT)
        xcode = version.stdout.splitlines()[0].removeprefix("Xcode ").strip() if version.stdout else "unknown"
        devices = self._list_devices()
        match = next((d for d in devices if d.get("hardwareProperties", {}).get("udid") == self.udid), None)
        if match is None:
            listed = ", ".join(
                f"{d.get('deviceProperties', {}).get('name', '?')} ({d.get('hardwareProperties', {}).get('udid', '?')})"
                for d in devices
            )
            raise UserError(
                f"ios device '{self.name}': udid {self.udid} is not connected; connected: {listed or 'none'}",
                hint="unlock the device, trust this Mac, or fix the plan's udid",
            )
        if not Path(self.spec.project).exists():
            raise UserError(f"ios device '{self.name}': project {self.spec.project} does not exist")
        built = self._xcrun("xcodebuild", "build-for-testing", *self._project_args(), timeout=3600)
        if built.returncode != 0:
            raise UserError(
                f"ios device '{self.name}': building the harness for testing failed: "
                f"{(built.output.splitlines() or ['?'])[-1]}"
            )
        hardware = match.get("hardwareProperties", {})
        props = match.get("deviceProperties", {})
        self.info = DeviceInfo(
            id=self.udid,
            model=hardware.get("marketingName") or hardware.get("productType") or "unknown",
            os=hardware.get("platform", "iOS"),
            os_version=props.get("osVersionNumber", "unknown"),
            soc=(hardware.get("cpuType") or {}).get("name", "unknown"),
            extra={"product_type": hardware.get("productType"), "device_name": props.get("name")},
            tools={"xcode": xcode},
        )
        return self.info

    def _list_devices(self) -> list[dict]:
        out = self._local / "devices.json"
        result = self._xcrun("devicectl", "list", "devices", "--json-output", str(out), timeout=60)
        if result.returncode != 0 or not out.is_file():
            raise UserError(f"'xcrun devicectl list devices' failed: {result.output}", hint=XCRUN_INSTALL_HINT)
        try:
            return json.loads(out.read_text(encoding="utf-8"))["result"]["devices"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"'xcrun devicectl list devices' wrote unexpected JSON: {exc}") from exc

    def _copy_to(self, source: Path, destination: str) -> None:
        args = (
            "devicectl",
            "device",
            "copy",
            "to",
            "--device",
            self.udid,
            "--domain-type",
            "appDataContainer",
            "--domain-identifier",
            self.spec.app_bundle_id,
            "--source",
            str(source),
            "--destination",
            destination,
        )
        self._checked(self._xcrun(*args), f"copying {source.name} to the device")

    def prepare(self, bundle: BenchBundle) -> None:
        """Copy the bundle's files and prompt files into the harness app's container."""
        tag = f"{bundle.name}-{bundle.manifest_sha256[:12]}"
        remote_bundle = f"{REMOTE_ROOT}/bundles/{tag}"
        remote_prompts = f"{REMOTE_ROOT}/prompts/{tag}"
        for rel in [entry.path for entry in bundle.manifest.files] + [MANIFEST_NAME]:
            self._copy_to(bundle.path / rel, f"{remote_bundle}/{rel}")
        for length, local in sorted(bundle.prompts.items()):
            self._copy_to(local, f"{remote_prompts}/prompt-{length}.json")
        self._remote[bundle.name] = (remote_bundle, remote_prompts)

    def measure(self, job: Job, repetition: int) -> Outcome:
        """One ``xcodebuild test-without-building`` run of the harness test; results from its attachment."""
        remote_bundle, remote_prompts = self._remote[job.bundle.name]
        stem = f"{job.bundle.name}-{job.scenario.name}-{repetition}"
        result_bundle = self._local / f"{stem}.xcresult"
        exported = self._local / f"{stem}-attachments"
        shutil.rmtree(result_bundle, ignore_errors=True)
        shutil.rmtree(exported, ignore_errors=True)
        argv = harness_argv(
            remote_bundle,
            f"{remote_prompts}/prompt-{job.scenario.prompt_tokens}.json",
            job.scenario.new_tokens,
            job.scenario.warmup,
            f"{REMOTE_ROOT}/results/{stem}.json",
        )
        run = self._xcrun(
            "xcodebuild",
            "test-without-building",
            *self._project_args(),
            f"-only-testing:{self.spec.test}",
            "-resultBundlePath",
            str(result_bundle),
            timeout=job.scenario.timeout_s + LAUNCH_GRACE_S,
            env={ARGS_VARIABLE: dumps({"argv": argv, "timeout_s": job.scenario.timeout_s})},
        )
        if run.timed_out:
            return Outcome(
                repetition,
                "timeout",
                failure_kind="timeout",
                reason=f"harness test gave no result within {job.scenario.timeout_s:g}s (+{LAUNCH_GRACE_S:g}s launch); killed",
            )
        if run.returncode != 0 and _GONE.search(run.output):
            raise DeviceGone(
                f"device {self.udid} disconnected while the harness ran: {matching_line(run.output, _GONE)}"
            )
        text = self._attachment(result_bundle, exported)
        if text is None:
            return no_results(
                f"xcodebuild exited with status {run.returncode}; the result bundle has no {ATTACHMENT_NAME}",
                repetition,
                run.output,
            )
        return outcome_from_results(text, job, repetition)

    def _attachment(self, result_bundle: Path, exported: Path) -> str | None:
        """The harness results attached to the result bundle, exported with xcresulttool."""
        if not result_bundle.exists():
            return None
        export = self._xcrun(
            "xcresulttool", "export", "attachments", "--path", str(result_bundle), "--output-path", str(exported)
        )
        manifest = exported / "manifest.json"
        if export.returncode != 0 or not manifest.is_file():
            return None
        try:
            tests = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError:
            return None
        for test in tests if isinstance(tests, list) else []:
            for attachment in test.get("attachments", []):
                names = (attachment.get("suggestedHumanReadableName", ""), attachment.get("exportedFileName", ""))
                if any(name.startswith(ATTACHMENT_NAME.removesuffix(".json")) for name in names):
                    path = exported / attachment.get("exportedFileName", "")
                    if path.is_file():
                        return path.read_text(encoding="utf-8", errors="replace")
        return None

    def close(self) -> None:
        shutil.rmtree(self._local, ignore_errors=True)
