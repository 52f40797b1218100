"""Property-based: valid manifests, reference files, recipes, model configs, plans and result
lines, mutated at random (hypothesis), must get either a success or one `error:` line and a
non-zero exit from the CLI: never a traceback, never a native abort, never a file opened outside
the input or written outside the output folder, never a marker file written by code in the input.

The CLI runs in this process (``CliRunner``): every input is validated before native code sees
it, so a native abort here would itself be the failure (test_security.py also runs the one known
abort case in a fresh process). Every file ``open`` during a command is recorded with an audit
hook: nothing may be opened in an "outside" folder that the mutations point paths at, and nothing
written except in the output folder (and the private copy a bundle's tokenizer is loaded from).
Run with ``--hypothesis-show-statistics`` to see how many examples succeed and how many are refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from cli_checks import LLAMA
from click.testing import CliRunner
from doubles.lab import bench_record, fake_bundle, scenario
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mobile_export.bundle import MANIFEST_NAME, read_manifest, write_manifest
from mobile_export.cli import main
from mobile_export.reference import REFERENCE_NAME

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MARKER = "MOBILE_EXPORT_MARKER"
TOKENIZER_COPY = "mobile-export-tokenizer-"  # bundle.load_tokenizer's private copy

_opened: list[str] | None = None


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        mode, flags = args[1], args[2]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        _opened.append((os.path.abspath(os.fsdecode(args[0])), writes))


sys.addaudithook(_audit)  # inert unless a test is recording


class Sandbox:
    """A fresh folder per example: ``input``/``output`` for the command, ``outside`` with a
    secret (and tokenizer-looking) files that no command may open, and a code file that would
    write a marker if anything imported it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hostile-"))
        self.outside = self.root / "outside"
        self.outside.mkdir()
        (self.outside / "secret.txt").write_text("secret\n")
        (self.outside / "tokenizer.json").write_text("{}")
        (self.outside / "evil.py").write_text(f"open({str(self.root / MARKER)!r}, 'w').write('ran')\n")
        self.output = self.root / "output"

    def files(self) -> set[Path]:
        return {p for p in self.root.rglob("*")}

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def hostile_values(sandbox_root: str) -> st.SearchStrategy:
    """Values a hostile or broken input may hold where a valid one has something else."""
    outside = f"{sandbox_root}/outside"
    paths = st.sampled_from(
        [
            "../outside/secret.txt",
            "../../outside/evil.py",
            f"{outside}/secret.txt",
            f"{outside}/tokenizer.json",
            "..",
            ".",
            "",
            "a/../../outside/secret.txt",
            "sub\\..\\..\\secret.txt",
            "C:/secret.txt",
            "model.pte",
            "tokenizer.json",
            "manifest.json",
            "reference.json",
            "nul\x00byte",
            "\u00e9t\u00e9.pte",
        ]
    )
    numbers = st.one_of(
        st.integers(min_value=-3, max_value=3000),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
    )
    leaves = st.one_of(st.none(), st.booleans(), numbers, paths, st.text(max_size=12))
    return st.one_of(
        leaves,
        st.lists(st.one_of(numbers, paths), max_size=4),
        st.dictionaries(st.sampled_from(["file", "path", "bytes", "sha256", "x"]), leaves, max_size=3),
    )


def node_paths(doc, prefix=()) -> list[tuple]:
    """Every key path into a JSON-like document (the root included)."""
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += node_paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            out += node_paths(value, (*prefix, index))
    return out


def numeric_paths(doc) -> list[tuple]:
    """Key paths of every number in a document (where plausible-looking wrong values go)."""
    out = []
    for path in node_paths(doc):
        value = doc
        for key in path:
            value = value[key]
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.append(path)
    return out


def mutate(data: st.DataObject, doc, values: st.SearchStrategy, max_ops: int = 3):
    """``doc`` with 1..max_ops random replacements, deletions or insertions anywhere in it."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, max_ops), label="operations")):
        path = data.draw(st.sampled_from(node_paths(doc)), label="at")
        op = data.draw(st.sampled_from(["replace", "delete", "insert"]), label="op")
        value = data.draw(values, label="value")
        if not path:
            if op == "replace":
                doc = value
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        if op == "replace":
            parent[last] = value
        elif op == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["file", "files", "path", "extra", str(last)]), label="key")] = value
        else:
            parent.insert(last, value)
    return doc


def tweak_numbers(data: st.DataObject, doc, vocab: int, max_ops: int = 4):
    """``doc`` with some of its numbers replaced by plausible wrong ones of the same type:
    integers around the vocabulary's edge, log-probabilities anywhere below zero."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, max_ops), label="tweaks")):
        path = data.draw(st.sampled_from(numeric_paths(doc)), label="at")
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent[path[-1]], int):
            parent[path[-1]] = data.draw(st.integers(-2, vocab + 2), label="int")
        else:
            parent[path[-1]] = data.draw(st.floats(-60, 0), label="float")
    return doc


def run_cli(sandbox: Sandbox, *args, allowed_new: tuple[Path, ...] = ()) -> object:
    """Invoke the CLI, recording every file opened; check the answer's shape and its footprint."""
    global _opened
    before = sandbox.files()
    _opened = []
    try:
        result = CliRunner().invoke(main, [str(a) for a in args], input="y\ny\n")
    finally:
        opened, _opened = _opened, None
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        repr(result.exception),
        result.output[-2000:],
    )
    assert "Traceback" not in result.output
    event(f"{args[0]}: exit {result.exit_code}")  # shown by --hypothesis-show-statistics
    if result.exit_code != 0:
        lines = result.stderr.splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], (result.exit_code, result.stderr[-2000:])
    touched = [p for p, _ in opened if Path(p).is_relative_to(sandbox.outside)]
    assert not touched, touched
    # Writes only in the output folder, or in the private copy a bundle's tokenizer is loaded from.
    scratch = Path(tempfile.gettempdir())
    written = [
        p
        for p, writes in opened
        if writes
        and p != os.devnull
        and not Path(p).is_relative_to(sandbox.output)
        and not (Path(p).is_relative_to(scratch) and Path(p).relative_to(scratch).parts[0].startswith(TOKENIZER_COPY))
    ]
    assert not written, written
    assert not (sandbox.root / MARKER).exists()
    new = {p for p in sandbox.files() - before if not any(p.is_relative_to(a) for a in allowed_new)}
    assert not new, sorted(map(str, new))
    return result


def write_json(path: Path, doc) -> None:
    path.write_text(json.dumps(doc, allow_nan=True), encoding="utf-8")


# --- manifests (hand-built bundles; inspect touches no runtime) --------------------------------


@pytest.fixture(scope="module")
def fake_template(tmp_path_factory) -> Path:
    return fake_bundle(tmp_path_factory.mktemp("fake") / "demo-android")


def outside_entry(sandbox: Sandbox) -> dict:
    data = (sandbox.outside / "secret.txt").read_bytes()
    return {"path": "../outside/secret.txt", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@FAST
@given(data=st.data())
def test_mutated_manifests_inspect(fake_template, data):
    sandbox = Sandbox()
    try:
        bundle = Path(shutil.copytree(fake_template, sandbox.root / "input"))
        manifest = json.loads((bundle / MANIFEST_NAME).read_text())
        if data.draw(st.booleans(), label="outside entry with true checksum"):
            manifest["files"].append(outside_entry(sandbox))
        write_json(bundle / MANIFEST_NAME, mutate(data, manifest, hostile_values(str(sandbox.root))))
        result = run_cli(sandbox, "inspect", bundle)
        if result.exit_code == 0:
            assert "all checksums match" in result.stdout
            paths = [f.path for f in read_manifest(bundle).files]
            assert all(not p.startswith("/") and ".." not in p.split("/") for p in paths), paths
    finally:
        sandbox.close()


# --- recipes -----------------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_mutated_recipes_show_and_build_preflight(data):
    sandbox = Sandbox()
    try:
        recipe = yaml.safe_load((RECIPES_DIR / "demo.yaml").read_text())
        doc = mutate(data, recipe, hostile_values(str(sandbox.root)))
        path = sandbox.root / "input" / "recipe.yaml"
        path.parent.mkdir()
        text = yaml.safe_dump(doc, allow_unicode=True).encode()
        if data.draw(st.booleans(), label="corrupt bytes"):
            index = data.draw(st.integers(0, max(0, len(text) - 1)), label="byte index")
            text = text[:index] + data.draw(st.binary(min_size=1, max_size=3), label="bytes") + text[index + 1 :]
        path.write_bytes(text)
        run_cli(sandbox, "recipes", "show", path)
        # A file as the output's parent: every check before the heavy work runs, then it stops.
        blocker = sandbox.root / "output-is-a-file"
        blocker.write_text("x")
        result = run_cli(sandbox, "build", path, "-t", "android", "-o", blocker / "dist")
        assert result.exit_code != 0
        assert "Load " not in result.output
    finally:
        sandbox.close()


# --- model folder configs ------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_mutated_model_folder_configs_build_preflight(data):
    sandbox = Sandbox()
    try:
        folder = sandbox.root / "input"
        folder.mkdir()
        config = {**LLAMA, "max_position_embeddings": 256, "tie_word_embeddings": True}
        if data.draw(st.booleans(), label="plausible numbers"):
            doc = tweak_numbers(data, config, 64)
        else:
            doc = mutate(data, config, hostile_values(str(sandbox.root)))
        write_json(folder / "config.json", doc)
        (folder / "model.safetensors").write_bytes(b"never read: the destination check stops the build first")
        blocker = sandbox.root / "output-is-a-file"
        blocker.write_text("x")
        result = run_cli(sandbox, "build", "-t", "android", "--model-path", folder, "-o", blocker / "dist")
        assert result.exit_code != 0
        assert "Load " not in result.output
    finally:
        sandbox.close()


# --- plans -------------------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_mutated_plans(fake_template, data):
    sandbox = Sandbox()
    try:
        plan = {
            "name": "fuzz",
            "bundles": [{"path": str(fake_template)}],
            "devices": [{"name": "host", "kind": "host"}, {"name": "pixel", "kind": "android", "serial": "X1"}],
            "scenarios": [scenario()],
            "thresholds": {"decode_tokens_per_s": 10},
        }
        doc = mutate(data, plan, hostile_values(str(sandbox.root)))
        path = sandbox.root / "input" / "plan.yaml"
        path.parent.mkdir()
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        # A device the plan does not name: the plan is parsed and checked, nothing is measured.
        result = run_cli(sandbox, "bench", path, "--out", sandbox.output, "--device", "zz-not-in-plan")
        assert result.exit_code != 0
    finally:
        sandbox.close()


# --- result lines ------------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_mutated_result_lines(data):
    sandbox = Sandbox()
    try:
        folder = sandbox.root / "input"
        folder.mkdir()
        records = [bench_record(rep, 10.0 + rep) for rep in (1, 2, 3)]
        index = data.draw(st.integers(0, 2), label="record")
        records[index] = mutate(data, records[index], hostile_values(str(sandbox.root)))
        lines = [json.dumps(r, allow_nan=True) for r in records]
        if data.draw(st.booleans(), label="torn line"):
            lines[index] = lines[index][: data.draw(st.integers(0, len(lines[index])), label="cut")]
        (folder / "results.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        run_cli(sandbox, "report", folder, "--out", sandbox.output, allowed_new=(sandbox.output,))
    finally:
        sandbox.close()


# --- real bundle: manifests through run and verify, reference files through verify (slow) ------


def copy_real(tiny_quantized_build, sandbox: Sandbox) -> Path:
    return Path(shutil.copytree(tiny_quantized_build[0], sandbox.root / "input"))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_mutated_manifests_run_and_verify(tiny_quantized_build, data):
    sandbox = Sandbox()
    try:
        bundle = copy_real(tiny_quantized_build, sandbox)
        manifest = json.loads((bundle / MANIFEST_NAME).read_text())
        write_json(bundle / MANIFEST_NAME, mutate(data, manifest, hostile_values(str(sandbox.root)), max_ops=2))
        run_cli(sandbox, "run", bundle, "--prompt", "Once upon a time", "-n", "3")
        run_cli(sandbox, "verify", bundle)
    finally:
        sandbox.close()


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_mutated_reference_files_verify(tiny_quantized_build, data):
    sandbox = Sandbox()
    try:
        bundle = copy_real(tiny_quantized_build, sandbox)
        reference = json.loads((bundle / REFERENCE_NAME).read_text())
        if data.draw(st.booleans(), label="plausible numbers"):  # same shape: ids near the vocabulary's edge
            reference = tweak_numbers(data, reference, read_manifest(bundle).vocab_size())
        else:
            reference = mutate(data, reference, hostile_values(str(sandbox.root)))
        write_json(bundle / REFERENCE_NAME, reference)
        write_manifest(bundle, read_manifest(bundle))  # a hostile author updates the checksums
        result = run_cli(sandbox, "verify", bundle)
        assert result.exit_code in (0, 2, 3), result.output[-2000:]
    finally:
        sandbox.close()


def test_result_line_without_warmup_reports_the_schema_default(tmp_path):
    """Found by test_mutated_result_lines: ``scenario.warmup`` is optional in the record schema
    (default 0), so a line without it is reported, not a KeyError."""
    records = [bench_record(rep, 10.0 + rep) for rep in (1, 2)]
    del records[0]["scenario"]["warmup"]
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "results.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["report", str(folder), "--out", str(tmp_path / "out")])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output
    assert "0 warm-up" in "".join(p.read_text() for p in (tmp_path / "out").rglob("*.md"))
