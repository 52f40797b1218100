"""A device pool in AWS Device Farm (boto3, imported only here).

connect   check the project and pool, upload the app and its test package (and test spec): each is
          ``create_upload`` → HTTP PUT to the presigned URL → ``get_upload`` until ``SUCCEEDED``.
prepare   upload the bundle and its prompt files as one ``EXTERNAL_DATA`` zip (``bundle/``, ``prompts/``).
run       one ``schedule_run`` per bundle x scenario on the pool; the harness arguments travel in the
          run's environment variables (``MOBILE_EXPORT_HARNESS_ARGS``, ``MOBILE_EXPORT_REPETITIONS``);
          the on-device test runs the harness once per repetition and leaves
          ``mobile-export-results-<n>.json`` in its customer-artifacts folder. ``get_run`` is polled
          until ``COMPLETED`` (``stop_run`` past the plan's limit), then every job's ``FILE``
          artifacts are listed and the ``CUSTOMER_ARTIFACT`` zip downloaded and read.

HTTP transfers go through ``upload(url, path)`` and ``download(url) -> bytes``, replaceable in tests.
"""

from __future__ import annotations

import io
import re
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mobile_export.bundle import MANIFEST_NAME
from mobile_export.errors import UserError

from ..bundles import BenchBundle
from ..harness import harness_argv
from . import Device, DeviceError, DeviceInfo, Job, Outcome, dumps, no_results, outcome_from_results

BOTO3_HINT = "install it with: pip install 'mobile-export[devicefarm]'"
ARTIFACTS_DIR = {"android": "/sdcard/mobile-export-results", "ios": "Documents/mobile-export-results"}
DATA_ROOT = {"android": "/sdcard/mobile-export-data", "ios": "Documents/mobile-export-data"}
UPLOAD_TYPES = {
    "android": ("ANDROID_APP", "INSTRUMENTATION_TEST_PACKAGE", "INSTRUMENTATION_TEST_SPEC", "INSTRUMENTATION"),
    "ios": ("IOS_APP", "XCTEST_TEST_PACKAGE", "XCTEST_UI_TEST_SPEC", "XCTEST"),
}
_RESULT_NAME = re.compile(r"mobile-export-results-(\d+)\.json$")


def http_put(url: str, path: Path) -> None:
    """Upload a file to a presigned URL (the default uploader)."""
    request = urllib.request.Request(url, data=path.read_bytes(), method="PUT")
    request.add_header("Content-Type", "application/octet-stream")
    with urllib.request.urlopen(request, timeout=600) as response:  # noqa: S310 - AWS presigned https URL
        if response.status >= 300:
            raise DeviceError(f"upload of {path.name} failed with HTTP {response.status}")


def http_get(url: str) -> bytes:
    """Download an artifact from its presigned URL (the default downloader)."""
    with urllib.request.urlopen(url, timeout=600) as response:  # noqa: S310 - AWS presigned https URL
        return response.read()


class DeviceFarmDevice(Device):
    """One plan device standing for every phone of a Device Farm pool."""

    kind = "devicefarm"

    def __init__(
        self,
        spec,
        client=None,
        upload: Callable[[str, Path], None] = http_put,
        download: Callable[[str], bytes] = http_get,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(spec)
        self.client = client
        self.upload = upload
        self.download = download
        self.sleep = sleep
        self.clock = clock
        self.types = UPLOAD_TYPES[spec.platform]
        self._arns: dict[str, str] = {}
        self._data: dict[str, str] = {}
        self._local = Path(tempfile.mkdtemp(prefix="mobile-export-devicefarm-"))

    @property
    def key(self) -> str:
        return f"devicefarm:{self.spec.device_pool_arn}"

    def _client(self):
        if self.client is None:
            try:
                import boto3
            except ImportError as exc:
                raise UserError(f"devicefarm device '{self.name}' needs boto3", hint=BOTO3_HINT) from exc
            self.client = boto3.client("devicefarm", region_name=self.spec.region)
        return self.client

    def _call(self, operation: str, **kwargs):
        """A Device Farm API call; AWS errors become one line naming the call."""
        client = self._client()  # first: says how to install boto3 when it is missing
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(client, operation)(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise DeviceError(f"Device Farm {operation} failed: {exc}") from exc

    def connect(self) -> DeviceInfo:
        """Project and pool reachable; app, test package and test spec uploaded."""
        for label, path in (
            ("app", self.spec.app),
            ("test_package", self.spec.test_package),
            ("test_spec", self.spec.test_spec),
        ):
            if path is not None and not Path(path).is_file():
                raise UserError(f"devicefarm device '{self.name}': {label} {path} does not exist")
        try:
            self._call("get_project", arn=self.spec.project_arn)
            pool = self._call("get_device_pool", arn=self.spec.device_pool_arn)["devicePool"]
            app_type, package_type, spec_type, _ = self.types
            self._arns["app"] = self._upload_file(Path(self.spec.app), app_type)
            self._arns["test_package"] = self._upload_file(Path(self.spec.test_package), package_type)
            if self.spec.test_spec:
                self._arns["test_spec"] = self._upload_file(Path(self.spec.test_spec), spec_type)
        except DeviceError as exc:
            raise UserError(f"devicefarm device '{self.name}': {exc}") from exc
        import botocore

        self.info = DeviceInfo(
            id=self.spec.device_pool_arn,
            model=f"pool {pool.get('name', '?')}",
            os=self.spec.platform,
            extra={"pool": pool.get("name"), "region": self.spec.region},
            tools={"botocore": botocore.__version__},
        )
        return self.info

    def _upload_file(self, path: Path, upload_type: str, timeout_s: float = 600.0) -> str:
        """create_upload, PUT the file, wait until Device Farm has processed it; returns its ARN."""
        upload = self._call("create_upload", projectArn=self.spec.project_arn, name=path.name, type=upload_type)
        upload = upload["upload"]
        self.upload(upload["url"], path)
        deadline = self.clock() + timeout_s
        while True:
            status = self._call("get_upload", arn=upload["arn"])["upload"]
            if status["status"] == "SUCCEEDED":
                return upload["arn"]
            if status["status"] == "FAILED":
                raise DeviceError(f"Device Farm rejected {path.name}: {status.get('message', 'no reason given')}")
            if self.clock() > deadline:
                raise DeviceError(f"Device Farm did not process {path.name} within {timeout_s:g}s")
            self.sleep(min(self.spec.poll_interval_s, 10.0))

    def prepare(self, bundle: BenchBundle) -> None:
        """Upload the bundle and its prompts as the run's extra data package."""
        archive = self._local / f"{bundle.name}-{bundle.manifest_sha256[:12]}.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as out:
            for rel in [entry.path for entry in bundle.manifest.files] + [MANIFEST_NAME]:
                out.write(bundle.path / rel, f"bundle/{rel}")
            for length, local in sorted(bundle.prompts.items()):
                out.write(local, f"prompts/prompt-{length}.json")
        self._data[bundle.name] = self._upload_file(archive, "EXTERNAL_DATA")

    def measure(self, job: Job, repetition: int) -> Outcome:
        """Not used: a Device Farm run takes all of a job's repetitions (see :meth:`run`)."""
        return next(iter(self.run(Job(job.bundle, job.scenario, [repetition]))))

    def run(self, job: Job) -> Iterator[Outcome]:
        """Schedule one run for all the job's repetitions; yield every pool device's outcomes."""
        root = DATA_ROOT[self.spec.platform]
        argv = harness_argv(
            f"{root}/bundle",
            f"{root}/prompts/prompt-{job.scenario.prompt_tokens}.json",
            job.scenario.new_tokens,
            job.scenario.warmup,
            f"{ARTIFACTS_DIR[self.spec.platform]}/mobile-export-results-{{repetition}}.json",
        )
        test = {"type": self.types[3], "testPackageArn": self._arns["test_package"]}
        if "test_spec" in self._arns:
            test["testSpecArn"] = self._arns["test_spec"]
        paths = {"androidPaths" if self.spec.platform == "android" else "iosPaths": [ARTIFACTS_DIR[self.spec.platform]]}
        minutes = max(1, int(job.scenario.timeout_s * len(job.repetitions) / 60) + 5)
        run = self._call(
            "schedule_run",
            projectArn=self.spec.project_arn,
            appArn=self._arns["app"],
            devicePoolArn=self.spec.device_pool_arn,
            name=f"mobile-export {job.bundle.name} {job.scenario.name}",
            test=test,
            configuration={
                "extraDataPackageArn": self._data[job.bundle.name],
                "customerArtifactPaths": paths,
                "environmentVariables": [
                    {"name": "MOBILE_EXPORT_HARNESS_ARGS", "value": dumps({"argv": argv})},
                    {"name": "MOBILE_EXPORT_REPETITIONS", "value": ",".join(map(str, job.repetitions))},
                    {"name": "MOBILE_EXPORT_TIMEOUT_S", "value": f"{job.scenario.timeout_s:g}"},
                ],
            },
            executionConfiguration={"jobTimeoutMinutes": minutes},
        )["run"]
        finished = self._wait(run["arn"])
        if finished is None:
            for repetition in job.repetitions:
                yield Outcome(
                    repetition,
                    "timeout",
                    failure_kind="timeout",
                    reason=f"Device Farm run {run['arn']} not completed within {self.spec.run_timeout_minutes:g} min; stopped",
                )
            return
        yield from self._collect(finished, job)

    def _wait(self, run_arn: str) -> dict | None:
        """Poll until the run completes; None (after stop_run) past the plan's limit."""
        deadline = self.clock() + self.spec.run_timeout_minutes * 60
        while True:
            run = self._call("get_run", arn=run_arn)["run"]
            if run["status"] == "COMPLETED":
                return run
            if self.clock() > deadline:
                self._call("stop_run", arn=run_arn)
                return None
            self.sleep(self.spec.poll_interval_s)

    def _collect(self, run: dict, job: Job) -> Iterator[Outcome]:
        jobs = self._call("list_jobs", arn=run["arn"]).get("jobs", [])
        if not jobs:
            for repetition in job.repetitions:
                yield no_results(
                    f"Device Farm run ended {run.get('result')} without jobs: {run.get('message', '')}", repetition
                )
            return
        for farm_job in jobs:
            device = _device_info(farm_job.get("device", {}))
            found = self._results_files(farm_job["arn"])
            for repetition in job.repetitions:
                text = found.get(repetition)
                if text is None:
                    outcome = no_results(
                        f"Device Farm job on {device.model} ended {farm_job.get('result')} without "
                        f"mobile-export-results-{repetition}.json",
                        repetition,
                        farm_job.get("message", ""),
                    )
                else:
                    outcome = outcome_from_results(text, job, repetition)
                outcome.device = device
                yield outcome

    def _results_files(self, job_arn: str) -> dict[int, str]:
        """Harness results by repetition, from the job's customer-artifact zips."""
        artifacts = self._call("list_artifacts", arn=job_arn, type="FILE").get("artifacts", [])
        found: dict[int, str] = {}
        for artifact in artifacts:
            if artifact.get("type") != "CUSTOMER_ARTIFACT":
                continue
            data = self.download(artifact["url"])
            try:
                archive = zipfile.ZipFile(io.BytesIO(data))
            except zipfile.BadZipFile:
                continue
            for name in archive.namelist():
                match = _RESULT_NAME.search(name)
                if match:
                    found[int(match.group(1))] = archive.read(name).decode("utf-8", errors="replace")
        return found


def _device_info(device: dict) -> DeviceInfo:
    cpu = device.get("cpu") or {}
    return DeviceInfo(
        id=device.get("arn", "unknown"),
        model=" ".join(p for p in (device.get("manufacturer"), device.get("model") or device.get("name")) if p)
        or "unknown",
        os=device.get("platform", "unknown").title().replace("Ios", "iOS"),
        os_version=device.get("os", "unknown"),
        soc=cpu.get("architecture", "unknown"),
        extra={"memory_bytes": device.get("memory"), "form_factor": device.get("formFactor")},
    )
