"""Bundles, model folders and other inputs that try to hurt: no foreign code runs, no path reaches
outside, no native abort, normal file modes, and one `error:` line for every bad input.

Fast tests use hand-built bundles (any bytes as model.pte); the `slow` ones share one real tiny
bundle built once per session (conftest's ``tiny_quantized_build``: a 1-layer 8da4w Llama shape).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cli_checks import LLAMA, error_line, invoke
from doubles.lab import fake_bundle

from mobile_export.bundle import (
    MANIFEST_NAME,
    normalize_modes,
    read_manifest,
    staged_bundle,
    write_manifest,
    write_zip,
)
from mobile_export.errors import UserError
from mobile_export.reference import REFERENCE_NAME

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
EVIL_TOKENIZER_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("code from the bundle ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def edit_manifest(bundle: Path, change) -> None:
    """Rewrite manifest.json with ``change(data)`` applied (checksums are not recomputed)."""
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    change(data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


def rechecksum(bundle: Path) -> None:
    """Recompute the manifest's file list, as a hostile author who edits files would."""
    write_manifest(bundle, read_manifest(bundle))


def add_remote_code_tokenizer(bundle: Path, marker: Path) -> None:
    """Give a bundle a tokenizer that asks transformers to import a .py file of the bundle."""
    (bundle / "tokenization_evil.py").write_text(EVIL_TOKENIZER_CODE.format(marker=str(marker)))
    config_path = bundle / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.update(
        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer"
    )
    config_path.write_text(json.dumps(config))
    manifest = read_manifest(bundle)
    manifest.tokenizer.files = sorted({*manifest.tokenizer.files, "tokenizer_config.json", "tokenization_evil.py"})
    write_manifest(bundle, manifest)


@pytest.fixture
def bundle(tmp_path) -> Path:
    return fake_bundle(tmp_path / "bundles" / "demo-android")


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside every bundle, with real contents."""
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text("not part of any bundle\n")
    return path


# --- 1. no code from a bundle -----------------------------------------------------------------


def test_bundle_tokenizer_with_remote_code_is_refused_and_never_run(bundle, tmp_path):
    from mobile_export.run import load_bundle_tokenizer

    marker = tmp_path / "MARKER"
    add_remote_code_tokenizer(bundle, marker)
    with pytest.raises(UserError) as caught:
        load_bundle_tokenizer(bundle)
    assert "asks to run its own Python code" in caught.value.one_line()
    assert "\n" not in caught.value.one_line()
    assert not marker.exists()


def test_bundle_tokenizer_never_prompts_even_on_a_terminal_answer(bundle, tmp_path):
    """A prompt would read the 'y' on stdin and run the code: in a fresh process, nothing runs
    and no question is asked."""
    marker = tmp_path / "MARKER"
    add_remote_code_tokenizer(bundle, marker)
    code = (
        "import sys; from pathlib import Path; from mobile_export.run import load_bundle_tokenizer\n"
        "from mobile_export.errors import UserError\n"
        "try:\n    load_bundle_tokenizer(Path(sys.argv[1]))\nexcept UserError as e:\n    print('refused:', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(bundle)], input="y\ny\n", capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr
    assert not marker.exists()


def test_bundle_tokenizer_reads_only_the_listed_files(bundle, tmp_path):
    """A tokenizer file the manifest does not list (e.g. code dropped in later) is never seen."""
    from mobile_export.run import load_bundle_tokenizer

    marker = tmp_path / "MARKER"
    (bundle / "tokenization_evil.py").write_text(EVIL_TOKENIZER_CODE.format(marker=str(marker)))
    tokenizer = load_bundle_tokenizer(bundle)
    assert tokenizer("hello")["input_ids"]
    assert not marker.exists()


def test_model_folder_tokenizer_with_remote_code_is_one_line(tmp_path):
    from mobile_export.sources import _load_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(fake_bundle(tmp_path / "b"), folder)
    marker = tmp_path / "MARKER"
    add_remote_code_tokenizer(folder, marker)
    with pytest.raises(UserError) as caught:
        _load_tokenizer(folder, trust_remote_code=False)
    line = caught.value.one_line()
    assert line == f"the tokenizer in {folder} needs its own Python code (pass --trust-remote-code if you trust it)"
    assert not marker.exists()


@pytest.mark.parametrize("model_type", ["evil", "llama"])
def test_model_folder_with_remote_config_code_is_refused_in_one_line(tmp_path, model_type):
    folder = tmp_path / "model"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = {**LLAMA, "model_type": model_type, "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not reached")
    result = invoke("build", "-t", "android", "--model-path", folder, "-o", tmp_path / "o", input="y\n")
    line = error_line(result)
    assert "Do you wish" not in result.output
    assert not marker.exists()
    if model_type == "evil":
        assert line == f"error: {folder} needs custom model code (pass --trust-remote-code if you trust it)"


def test_every_from_pretrained_passes_trust_remote_code():
    import ast

    root = Path(__file__).resolve().parent.parent / "mobile_export"
    calls = [
        (path.name, node.lineno, {k.arg for k in node.keywords})
        for path in root.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained"
    ]
    assert len(calls) >= 3, "the check found too few from_pretrained calls to prove anything"
    missing = [(name, line) for name, line, keywords in calls if "trust_remote_code" not in keywords]
    assert not missing, missing


# --- 2. manifest paths confined to the bundle -------------------------------------------------


def outside_entry(bundle: Path, outside: Path) -> dict:
    """A files entry naming the outside file by a relative path, with its true size and sha256."""
    import hashlib

    data = outside.read_bytes()
    rel = os.path.relpath(outside, bundle)
    return {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_inspect_refuses_a_files_entry_outside_the_bundle(bundle, outside):
    edit_manifest(bundle, lambda m: m["files"].append(outside_entry(bundle, outside)))
    line = error_line(invoke("inspect", bundle))
    assert "key 'files.4.path'" in line and "'..'" in line
    assert "all checksums match" not in line


def test_inspect_refuses_a_wrong_size_outside_without_reporting_it(bundle, outside):
    def change(m):
        entry = outside_entry(bundle, outside)
        m["files"].append({**entry, "bytes": 1})

    edit_manifest(bundle, change)
    result = invoke("inspect", bundle)
    line = error_line(result)
    assert str(outside.stat().st_size) not in result.output.replace(line, "")
    assert "'..'" in line


@pytest.mark.parametrize(
    "artifact",
    ["../../outside/evil.pte", "/etc/passwd", "C:/x.pte", "sub\\model.pte", "./model.pte", "", "a//b"],
)
@pytest.mark.parametrize("command", ["run", "verify", "inspect"])
def test_artifact_path_must_be_plain_and_inside(bundle, artifact, command):
    edit_manifest(bundle, lambda m: m["artifact"].update(file=artifact))
    args = ["--prompt", "hi"] if command == "run" else []
    line = error_line(invoke(command, bundle, *args))
    assert "key 'artifact.file'" in line
    assert "a bundle may only name its own files" in line


def test_artifact_must_be_a_checksummed_file(bundle):
    (bundle / "other.pte").write_bytes(b"not listed")
    edit_manifest(bundle, lambda m: m["artifact"].update(file="other.pte"))
    line = error_line(invoke("verify", bundle))
    assert "'other.pte' is not one of the bundle's checksummed files" in line


def test_folder_artifacts_are_covered_by_their_files(tmp_path):
    """A Core ML package is a folder: its files are checksummed, the folder name is the artifact."""
    from fake_bundles import make_manifest

    folder = tmp_path / "demo-ios"
    (folder / "model.mlpackage" / "Data").mkdir(parents=True)
    (folder / "model.mlpackage" / "Data" / "weights.bin").write_bytes(b"w" * 64)
    (folder / "model.mlpackage" / "Manifest.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    artifact = {"file": "model.mlpackage", "format": "coreml-mlpackage"}
    write_manifest(folder, make_manifest(target="ios", backend="coreml", artifact=artifact))
    manifest = read_manifest(folder)
    assert manifest.artifact_bytes() == 64 + 2
    edit_manifest(folder, lambda m: m["tokenizer"].update(files=["model.mlpackage"]))
    from mobile_export.run import load_bundle_tokenizer

    with pytest.raises(UserError, match="tokenizer file model.mlpackage is missing or not a file"):
        load_bundle_tokenizer(folder)
    edit_manifest(folder, lambda m: m["artifact"].update(file="model.mlpack"))
    line = error_line(invoke("inspect", folder))
    assert "'model.mlpack' is not one of the bundle's checksummed files" in line


@pytest.mark.parametrize("value", [None, 7, ["model.pte"]])
@pytest.mark.parametrize("command", ["run", "verify"])
def test_artifact_without_a_string_file(bundle, value, command):
    def change(m):
        if value is None:
            m["artifact"].pop("file")
        else:
            m["artifact"]["file"] = value

    edit_manifest(bundle, change)
    args = ["--prompt", "hi"] if command == "run" else []
    line = error_line(invoke(command, bundle, *args))
    assert "artifact.file" in line


def test_eval_refuses_an_artifact_without_file(bundle, tmp_path):
    edit_manifest(bundle, lambda m: m["artifact"].pop("file"))
    text = tmp_path / "text.txt"
    text.write_text("hello " * 50)
    line = error_line(invoke("eval", bundle, "--text", text, "--model-path", tmp_path))
    assert "key 'artifact.file' missing" in line


def test_tokenizer_file_outside_is_refused(bundle):
    edit_manifest(bundle, lambda m: m["tokenizer"].update(files=["../../outside/tokenizer.json"]))
    line = error_line(invoke("inspect", bundle))
    assert "key 'tokenizer.files.0'" in line


def test_a_link_to_a_file_outside_is_refused(bundle, outside):
    shutil.copyfile(outside, bundle / "tokenizer.json")
    rechecksum(bundle)  # checksums of the outside file's contents, then swap in a link
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").symlink_to(outside)
    line = error_line(invoke("inspect", bundle))
    assert "'tokenizer.json' leads outside the bundle" in line


def test_android_device_never_pushes_a_path_outside(bundle, outside, tmp_path, monkeypatch):
    """The phone side: a manifest naming '..' is refused before any adb push (test double of adb)."""
    from doubles.lab import FAKE_HARNESS, SERIAL, adb_double, scenario, write_plan

    state = adb_double(tmp_path, monkeypatch)
    edit_manifest(bundle, lambda m: m["files"].append(outside_entry(bundle, outside)))
    plan = write_plan(
        tmp_path / "plan.yaml",
        bundles=[{"path": str(bundle)}],
        devices=[{"name": "pixel", "kind": "android", "serial": SERIAL, "harness": str(FAKE_HARNESS)}],
        scenarios=[scenario()],
    )
    line = error_line(invoke("bench", plan, "--out", tmp_path / "results"))
    assert "'..'" in line
    assert not any("push" in argv for argv in state.argvs())


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../x.bin"])
def test_onnx_external_data_outside_the_folder_is_refused(tmp_path, location):
    import onnx
    from onnx import TensorProto, helper

    from mobile_export.runtimes.onnx import check_external_data

    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [0.0, 0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [weight],
    )
    path = tmp_path / "bundle" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(UserError, match="external data of tensor w") as caught:
        check_external_data(path)
    assert location in caught.value.one_line()
    # the same graph with its data inside the folder passes
    graph.initializer[0].external_data[0].value = "model.onnx.data"
    (path.parent / "model.onnx.data").write_bytes(bytes(8))
    path.write_bytes(helper.make_model(graph).SerializeToString())
    check_external_data(path)
    assert onnx.load(str(path)).graph.initializer[0].name == "w"


# --- 3. reference.json checked before anything runs --------------------------------------------


def reference_of(bundle: Path, prompts: list[dict]) -> None:
    from mobile_export.reference import ReferenceFile, ReferenceLimits

    reference = ReferenceFile(
        new_tokens=2,
        top_k=2,
        reference_dtype="float32",
        weights_meaningful=False,
        quantization="fp32",
        enforced=False,
        thresholds=ReferenceLimits(min_top1_agreement=0.5),
        prompts=prompts,
    )
    (bundle / REFERENCE_NAME).write_text(reference.model_dump_json(by_alias=True))
    rechecksum(bundle)


def prompt(token_ids=(5, 6), greedy=(7, 8), top_ids=(7, 9), logprobs=(-0.1, -2.0)) -> dict:
    steps = [{"top_ids": list(top_ids), "top_logprobs": list(logprobs)} for _ in greedy]
    return {"text": "x", "token_ids": list(token_ids), "greedy_tokens": list(greedy), "steps": steps}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (prompt(token_ids=(5, 10**9)), "token id 1000000000 is outside the vocabulary (0..1023)"),
        (prompt(greedy=(7, -1)), "token id -1 is outside the vocabulary"),
        (prompt(top_ids=(7, 4096)), "token id 4096 is outside the vocabulary"),
        (prompt(top_ids=(7, 9, 11)), "3 top_ids for 2 top_logprobs"),
        (prompt(top_ids=(), logprobs=()), "0 top_ids for 0 top_logprobs"),
        (prompt(token_ids=()), "has no token_ids"),
        (prompt(token_ids=range(600)), "needs 602 positions; the bundle's context is 512"),
    ],
)
def test_bad_reference_is_refused_before_the_artifact_loads(bundle, bad, message):
    # model.pte holds random bytes: reaching the runtime would say "ExecuTorch could not load"
    reference_of(bundle, [prompt(), bad])
    line = error_line(invoke("verify", bundle))
    assert f"{bundle / REFERENCE_NAME}: prompt 1" in line and message in line


def test_reference_with_wrong_types_is_one_line(bundle):
    (bundle / REFERENCE_NAME).write_text(json.dumps({"schema": "mobile-export.reference", "prompts": "many"}))
    rechecksum(bundle)
    line = error_line(invoke("verify", bundle))
    assert "reference.json: key" in line


# --- 4. normal file modes ---------------------------------------------------------------------


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_staged_bundle_and_zip_get_normal_modes(tmp_path, umask_027):
    import tempfile

    final = tmp_path / "dist" / "demo-android"
    with staged_bundle(final, force=False) as stage:
        (stage / "model.pte").write_bytes(b"pte")
        fd, tmp = tempfile.mkstemp(dir=stage)  # 0600, as reference.json's atomic write makes it
        os.close(fd)
        os.replace(tmp, stage / "reference.json")
        (stage / "sub").mkdir(mode=0o700)
        (stage / "sub" / "x.bin").write_bytes(b"x")
        zip_path = write_zip(stage, tmp_path / "dist" / "demo-android.zip")
    assert final.stat().st_mode & 0o777 == 0o750
    assert (final / "sub").stat().st_mode & 0o777 == 0o750
    for name in ("model.pte", "reference.json", "sub/x.bin"):
        assert (final / name).stat().st_mode & 0o777 == 0o640, name
    assert zip_path.stat().st_mode & 0o777 == 0o640
    with zipfile.ZipFile(zip_path) as archive:
        modes = {info.filename: (info.external_attr >> 16) & 0o777 for info in archive.infolist()}
    assert modes == {
        "demo-android/model.pte": 0o640,
        "demo-android/reference.json": 0o640,
        "demo-android/sub/x.bin": 0o640,
    }


def test_normalize_modes_follows_the_usual_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = tmp_path / "b"
        folder.mkdir(mode=0o700)
        (folder / "f").write_bytes(b"")
        (folder / "f").chmod(0o600)
        normalize_modes(folder)
        assert folder.stat().st_mode & 0o777 == 0o755
        assert (folder / "f").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


# --- the real tiny bundle (slow) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def real_build(tiny_quantized_build) -> tuple[Path, str]:
    return tiny_quantized_build


@pytest.fixture(scope="module")
def real_bundle(real_build) -> Path:
    return real_build[0]


@pytest.fixture
def real_copy(real_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(real_bundle, tmp_path / "copy"))


@pytest.mark.slow
def test_real_bundle_has_normal_modes(real_bundle):
    mask = os.umask(0o022)
    os.umask(mask)
    assert real_bundle.stat().st_mode & 0o777 == 0o777 & ~mask
    for path in real_bundle.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path.name
    with zipfile.ZipFile(real_bundle.parent / f"{real_bundle.name}.zip") as archive:
        assert {(i.external_attr >> 16) & 0o777 for i in archive.infolist()} == {0o666 & ~mask}


@pytest.mark.slow
def test_token_id_beyond_the_vocabulary_is_an_error_not_an_abort(real_copy):
    """Before: SIGABRT in ExecuTorch's embedding op (exit 134). Run in a fresh process so that a
    native abort would show as such rather than take pytest down."""
    data = json.loads((real_copy / REFERENCE_NAME).read_text())
    data["prompts"][0]["token_ids"][0] = 10**9
    (real_copy / REFERENCE_NAME).write_text(json.dumps(data))
    rechecksum(real_copy)
    done = subprocess.run(
        [sys.executable, "-m", "mobile_export.cli", "verify", str(real_copy)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "token id 1000000000 is outside the vocabulary (0..1023)" in done.stderr


@pytest.mark.slow
def test_run_with_a_remote_code_tokenizer_is_refused(real_copy, tmp_path):
    marker = tmp_path / "MARKER"
    add_remote_code_tokenizer(real_copy, marker)
    result = invoke("run", real_copy, "--prompt", "hello", "-n", "2", input="y\n")
    line = error_line(result)
    assert "asks to run its own Python code" in line
    assert "Do you wish" not in result.output
    assert not marker.exists()


@pytest.mark.slow
def test_real_bundle_still_runs_and_verifies(real_bundle):
    result = invoke("verify", real_bundle)
    assert result.exit_code == 0, result.output
    result = invoke("run", real_bundle, "--prompt", "hello", "-n", "4")
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_plain_build_prints_progress_only(real_build):
    """No native runtime logs (kernel notices, CPU probing, tokenizer regex notes) or library
    warnings: every stderr line of a plain build is a step, a note or the summary."""
    _, stderr = real_build
    assert "Export and convert (xnnpack)" in stderr  # the build did run its steps
    for noise in ("No temp allocator", "cpuinfo", "regex.cpp", "UserWarning", "Mutation on a buffer"):
        assert noise not in stderr, noise
    assert all(line[:1] in ("…", "✓", " ", "") for line in stderr.splitlines()), stderr


@pytest.mark.slow
def test_executorch_step_refuses_ids_outside_the_programs_vocabulary(real_bundle):
    """The last guard before native code: ids are checked against the .pte's own get_vocab_size
    (a tokenizer that does not belong to the model would otherwise abort the process)."""
    from mobile_export.runtimes.executorch import ExecuTorchRuntime

    runtime = ExecuTorchRuntime(real_bundle / "model.pte")
    assert runtime.vocab_size == 1024
    assert runtime.step([5, 6], 0).shape == (1024,)
    for bad in (1024, 10**9, -1):
        with pytest.raises(UserError, match=f"token id {bad} is outside the model's vocabulary of 1024"):
            runtime.step([5, bad], 2)
