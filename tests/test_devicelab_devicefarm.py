"""AWS Device Farm client against botocore's Stubber — no AWS account, no network.

The Stubber checks every call's operation and exact parameters in order and answers with
responses shaped like the service model. Uploads to presigned URLs and artifact downloads go
through injected functions; the results files in the downloaded artifact zip are written by the
test double of the on-device harness (tests/doubles/fake_harness.py) run on this machine.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY, Stubber
from doubles.lab import FAKE_HARNESS, fake_bundle

from mobile_export.devicelab.bundles import open_bench_bundle, write_prompts
from mobile_export.devicelab.devices import Job
from mobile_export.devicelab.devices.devicefarm import DeviceFarmDevice
from mobile_export.devicelab.plan import DeviceFarmDeviceSpec, Scenario
from mobile_export.errors import UserError

PROJECT = "arn:aws:devicefarm:us-west-2:123456789012:project:0f1e2d3c"
POOL = "arn:aws:devicefarm:us-west-2:123456789012:devicepool:0f1e2d3c/pixels"
RUN = "arn:aws:devicefarm:us-west-2:123456789012:run:0f1e2d3c/run1"


def upload_arn(name: str) -> str:
    return f"arn:aws:devicefarm:us-west-2:123456789012:upload:0f1e2d3c/{name}"


class Clock:
    """A fake monotonic clock that sleeping advances."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def lab(tmp_path):
    """A Device Farm device on a stubbed client, with a bundle and its prompt files."""
    (tmp_path / "app.apk").write_bytes(b"PK app")
    (tmp_path / "tests.apk").write_bytes(b"PK tests")
    spec = DeviceFarmDeviceSpec(
        kind="devicefarm",
        name="farm",
        platform="android",
        project_arn=PROJECT,
        device_pool_arn=POOL,
        app=str(tmp_path / "app.apk"),
        test_package=str(tmp_path / "tests.apk"),
        poll_interval_s=15,
        run_timeout_minutes=10,
    )
    client = boto3.client(
        "devicefarm", region_name="us-west-2", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    uploads: list[tuple[str, str, bytes]] = []
    downloads: dict[str, bytes] = {}
    clock = Clock()
    device = DeviceFarmDevice(
        spec,
        client=client,
        upload=lambda url, path: uploads.append((url, path.name, path.read_bytes())),
        download=lambda url: downloads[url],
        sleep=clock.sleep,
        clock=clock,
    )
    bundle = open_bench_bundle(fake_bundle(tmp_path / "dist" / "tiny-android"))
    write_prompts(bundle, {8}, tmp_path / "prompts")
    with Stubber(client) as stubber:
        yield device, stubber, bundle, uploads, downloads, clock


def expect_upload(stubber: Stubber, name: str, kind: str, statuses=("SUCCEEDED",)) -> None:
    arn = upload_arn(name)
    stubber.add_response(
        "create_upload",
        {"upload": {"arn": arn, "name": name, "type": kind, "status": "INITIALIZED", "url": f"https://s3.test/{name}"}},
        {"projectArn": PROJECT, "name": name, "type": kind},
    )
    for status in statuses:
        stubber.add_response(
            "get_upload", {"upload": {"arn": arn, "status": status, "message": "bad apk"}}, {"arn": arn}
        )


def expect_connect(stubber: Stubber) -> None:
    stubber.add_response("get_project", {"project": {"arn": PROJECT, "name": "lab"}}, {"arn": PROJECT})
    stubber.add_response("get_device_pool", {"devicePool": {"arn": POOL, "name": "pixels"}}, {"arn": POOL})
    expect_upload(stubber, "app.apk", "ANDROID_APP")
    expect_upload(stubber, "tests.apk", "INSTRUMENTATION_TEST_PACKAGE", ("PROCESSING", "SUCCEEDED"))


def harness_results(bundle, tmp_path: Path, repetition: int) -> bytes:
    """A results file written by the test double of the on-device harness for ``repetition``."""
    out = tmp_path / f"farm-out/mobile-export-results-{repetition}.json"
    subprocess.run(
        [sys.executable, str(FAKE_HARNESS), "--bundle", str(bundle.path), "--prompt", str(bundle.prompts[8]),
         "--new-tokens", "4", "--warmup", "0", "--output", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out.read_bytes()


def artifact_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_devicefarm_stubbed_run_uploads_schedules_polls_and_reads_artifacts(lab, tmp_path):
    device, stubber, bundle, uploads, downloads, clock = lab
    expect_connect(stubber)
    info = device.connect()
    assert info.model == "pool pixels" and info.id == POOL
    assert [(u[0], u[1]) for u in uploads] == [
        ("https://s3.test/app.apk", "app.apk"),
        ("https://s3.test/tests.apk", "tests.apk"),
    ]

    data_name = f"tiny-android-{bundle.manifest_sha256[:12]}.zip"
    expect_upload(stubber, data_name, "EXTERNAL_DATA")
    device.prepare(bundle)
    with zipfile.ZipFile(io.BytesIO(uploads[-1][2])) as archive:
        names = set(archive.namelist())
    assert {"bundle/model.pte", "bundle/manifest.json", "bundle/tokenizer.json", "prompts/prompt-8.json"} <= names

    scenario = Scenario(name="short", prompt_tokens=8, new_tokens=4, warmup=0, repetitions=2, timeout_s=60)
    argv = [
        "--bundle", "/sdcard/mobile-export-data/bundle", "--prompt", "/sdcard/mobile-export-data/prompts/prompt-8.json",
        "--new-tokens", "4", "--warmup", "0",
        "--output", "/sdcard/mobile-export-results/mobile-export-results-{repetition}.json",
    ]  # fmt: skip
    stubber.add_response(
        "schedule_run",
        {"run": {"arn": RUN, "status": "SCHEDULING"}},
        {
            "projectArn": PROJECT,
            "appArn": upload_arn("app.apk"),
            "devicePoolArn": POOL,
            "name": "mobile-export tiny-android short",
            "test": {"type": "INSTRUMENTATION", "testPackageArn": upload_arn("tests.apk")},
            "configuration": {
                "extraDataPackageArn": upload_arn(data_name),
                "customerArtifactPaths": {"androidPaths": ["/sdcard/mobile-export-results"]},
                "environmentVariables": [
                    {"name": "MOBILE_EXPORT_HARNESS_ARGS", "value": json.dumps({"argv": argv}, separators=(",", ":"))},
                    {"name": "MOBILE_EXPORT_REPETITIONS", "value": "1,2"},
                    {"name": "MOBILE_EXPORT_TIMEOUT_S", "value": "60"},
                ],
            },
            "executionConfiguration": {"jobTimeoutMinutes": 7},
        },
    )
    stubber.add_response("get_run", {"run": {"arn": RUN, "status": "RUNNING"}}, {"arn": RUN})
    stubber.add_response("get_run", {"run": {"arn": RUN, "status": "COMPLETED", "result": "PASSED"}}, {"arn": RUN})
    jobs = [
        {"arn": f"{RUN}/job-{i}", "result": "PASSED", "device": {"arn": f"arn:aws:devicefarm:us-west-2::device:{i:032d}", "manufacturer": m,
         "model": model, "platform": "ANDROID", "os": os_version, "cpu": {"architecture": "arm64-v8a"}}}
        for i, (m, model, os_version) in enumerate([("Google", "Pixel 8", "14"), ("Samsung", "Galaxy S24", "14")])
    ]  # fmt: skip
    stubber.add_response("list_jobs", {"jobs": jobs}, {"arn": RUN})
    results = {rep: harness_results(bundle, tmp_path, rep) for rep in (1, 2)}
    # job 0 returns both repetitions; job 1 only the first (its second crashed on the phone)
    for index, reps in enumerate([(1, 2), (1,)]):
        url = f"https://s3.test/job-{index}/customer.zip"
        downloads[url] = artifact_zip(
            {f"Host_Machine_Files/$DEVICEFARM_LOG_DIR/mobile-export-results-{r}.json": results[r] for r in reps}
        )
        stubber.add_response(
            "list_artifacts",
            {"artifacts": [
                {"arn": f"{jobs[index]['arn']}/a0", "name": "Logcat", "type": "DEVICE_LOG", "extension": "logcat", "url": "https://s3.test/log"},
                {"arn": f"{jobs[index]['arn']}/a1", "name": "Customer Artifacts", "type": "CUSTOMER_ARTIFACT", "extension": "zip", "url": url},
            ]},
            {"arn": jobs[index]["arn"], "type": "FILE"},
        )  # fmt: skip
    outcomes = list(device.run(Job(bundle, scenario, [1, 2])))
    stubber.assert_no_pending_responses()
    seen = [(o.device.model, o.repetition, o.status) for o in outcomes]
    assert seen == [
        ("Google Pixel 8", 1, "ok"),
        ("Google Pixel 8", 2, "ok"),
        ("Samsung Galaxy S24", 1, "ok"),
        ("Samsung Galaxy S24", 2, "failed"),
    ]
    assert outcomes[0].metrics["prompt_tokens"] == 8 and outcomes[0].metrics["peak_memory_bytes"] > 1e6
    assert outcomes[0].device.os == "Android" and outcomes[0].device.os_version == "14"
    assert "without mobile-export-results-2.json" in outcomes[3].reason
    assert 15 in clock.sleeps  # polled at the plan's interval


def test_devicefarm_run_past_its_limit_is_stopped_and_recorded_as_timeout(lab):
    device, stubber, bundle, _, _, clock = lab
    expect_connect(stubber)
    device.connect()
    expect_upload(stubber, f"tiny-android-{bundle.manifest_sha256[:12]}.zip", "EXTERNAL_DATA")
    device.prepare(bundle)
    stubber.add_response("schedule_run", {"run": {"arn": RUN, "status": "SCHEDULING"}}, {
        "projectArn": ANY, "appArn": ANY, "devicePoolArn": ANY, "name": ANY, "test": ANY,
        "configuration": ANY, "executionConfiguration": ANY,
    })  # fmt: skip
    for _ in range(42):  # polls at t = 0, 15, ... 615 s; the first past the 600 s limit stops the run
        stubber.add_response("get_run", {"run": {"arn": RUN, "status": "RUNNING"}}, {"arn": RUN})
    stubber.add_response("stop_run", {"run": {"arn": RUN, "status": "STOPPING"}}, {"arn": RUN})
    scenario = Scenario(name="short", prompt_tokens=8, new_tokens=4, repetitions=2, timeout_s=60)
    outcomes = list(device.run(Job(bundle, scenario, [1, 2])))
    stubber.assert_no_pending_responses()
    assert [(o.repetition, o.status) for o in outcomes] == [(1, "timeout"), (2, "timeout")]
    assert "not completed within 10 min; stopped" in outcomes[0].reason
    assert clock.now > 600


def test_devicefarm_rejected_upload_is_a_clear_error(lab):
    device, stubber, *_ = lab
    stubber.add_response("get_project", {"project": {"arn": PROJECT}}, {"arn": PROJECT})
    stubber.add_response("get_device_pool", {"devicePool": {"arn": POOL, "name": "pixels"}}, {"arn": POOL})
    expect_upload(stubber, "app.apk", "ANDROID_APP", ("PROCESSING", "FAILED"))
    with pytest.raises(UserError) as caught:
        device.connect()
    assert caught.value.one_line() == "devicefarm device 'farm': Device Farm rejected app.apk: bad apk"


def test_devicefarm_aws_error_names_the_call(lab):
    device, stubber, *_ = lab
    stubber.add_client_error("get_project", service_error_code="NotFoundException", service_message="No project")
    with pytest.raises(UserError) as caught:
        device.connect()
    assert "Device Farm get_project failed" in caught.value.one_line()
    assert "NotFoundException" in caught.value.one_line()


def test_devicefarm_without_boto3_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "a.apk").write_bytes(b"x")
    spec = DeviceFarmDeviceSpec(
        kind="devicefarm", name="farm", platform="android", project_arn=PROJECT, device_pool_arn=POOL,
        app=str(tmp_path / "a.apk"), test_package=str(tmp_path / "a.apk"),
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 (and botocore) now raise ImportError
    monkeypatch.setitem(sys.modules, "botocore", None)
    monkeypatch.setitem(sys.modules, "botocore.exceptions", None)
    with pytest.raises(UserError) as caught:
        DeviceFarmDevice(spec).connect()
    assert caught.value.one_line() == (
        "devicefarm device 'farm' needs boto3 (install it with: pip install 'mobile-export[devicefarm]')"
    )
