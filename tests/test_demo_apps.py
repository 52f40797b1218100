"""The demo apps (android_demo/, ios_demo/) cannot be compiled here (no Android SDK, no Xcode):
what is checked is what they read and write. Every manifest.json and reference.json field their
sources read (each through a ``path``-style accessor with a literal dotted name) exists in real
bundles ``mobile-export build`` writes for the backends they load, and the results file their
benchmarks write has every field of device_tests/HARNESS.md's contract and no other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mobile_export.devicelab.harness import OPTIONAL_FIELDS, REQUIRED_FIELDS, REQUIRED_OK_FIELDS

ROOT = Path(__file__).resolve().parents[1]
APPS = {"android_demo": ("*.kt", ["xnnpack", "onnx"]), "ios_demo": ("*.swift", ["coreml", "xnnpack"])}
# receiver.accessor("dotted.name"): the one way the apps read a bundle's JSON files
READ = re.compile(r"\b(manifest|reference)\.(?:path|string|int|double|ints|bool|strings)\(\s*\"([A-Za-z0-9_.]+)\"")
WRITE = re.compile(r"\brecord\.put\(\s*\"([a-z0-9_]+)\"")
BUILDS = {
    "xnnpack": ["demo", "--target", "android"],
    "onnx": ["demo", "--target", "android", "--backend", "onnx"],
    "coreml": ["demo", "--target", "ios"],
}


def _sources(app: str) -> dict[Path, str]:
    pattern = APPS[app][0]
    return {p: p.read_text(encoding="utf-8") for p in sorted((ROOT / app).rglob(pattern))}


def _resolves(document: dict, dotted: str) -> bool:
    node = document
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


@pytest.mark.parametrize("app", sorted(APPS))
def test_every_source_file_says_it_was_never_compiled(app):
    sources = _sources(app)
    assert sources, f"{app} has no sources"
    for path, text in sources.items():
        assert "Never compiled" in text.split("\n", 3)[0] + text.split("\n", 3)[1], path


@pytest.mark.parametrize("app", sorted(APPS))
def test_results_the_benchmark_writes_are_exactly_the_contracts_fields(app):
    written = {key for text in _sources(app).values() for key in WRITE.findall(text)}
    required = set(REQUIRED_FIELDS) | set(REQUIRED_OK_FIELDS)
    assert required <= written, f"{app} never writes {sorted(required - written)}"
    assert written <= required | set(OPTIONAL_FIELDS), f"{app} writes fields outside the contract: {sorted(written - required - set(OPTIONAL_FIELDS))}"


@pytest.mark.slow
@pytest.mark.parametrize("app", sorted(APPS))
def test_every_field_the_app_reads_exists_in_real_bundles(app, build_bundle):
    reads = {(kind, name) for text in _sources(app).values() for kind, name in READ.findall(text)}
    assert {kind for kind, _ in reads} == {"manifest", "reference"}, f"{app} reads no manifest or no reference fields"
    bundles = {}
    for backend in APPS[app][1]:
        bundle = build_bundle(*BUILDS[backend], "--no-eval").bundle
        bundles[backend] = {kind: json.loads((bundle / f"{kind}.json").read_text()) for kind in ("manifest", "reference")}
    for kind, name in sorted(reads):
        found = [backend for backend, files in bundles.items() if _resolves(files[kind], name)]
        # a backend's own artifact facts (Core ML compute units, min_os.ios) exist in its bundles only;
        # everything else every bundle has (optional values, e.g. no BOS, are written as null)
        backend_specific = kind == "manifest" and name.split(".")[0] in ("artifact", "min_os")
        assert found if backend_specific else len(found) == len(bundles), (
            f"{app} reads {kind}.json '{name}', which {sorted(set(bundles) - set(found))} bundles do not have"
        )
