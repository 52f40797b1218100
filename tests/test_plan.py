"""The build plan (resolved once from recipe + command line) and the backend's typed artifact."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from pathlib import Path

import pytest

from mobile_export.backends import ExportedArtifact, available, get_backend
from mobile_export.errors import UserError
from mobile_export.plan import BuildPlan, BuildRequest, resolve_plan, resolve_recipe


def plan_for(**request) -> BuildPlan:
    req = BuildRequest(recipe=request.pop("recipe", "demo"), target=request.pop("target", "android"), **request)
    return resolve_plan(req, resolve_recipe(req))


def test_recipe_settings_fill_the_plan():
    plan = plan_for(output_dir=Path("out"))
    assert (plan.backend_name, plan.spec.scheme, plan.spec.embedding) == ("xnnpack", "8da4w", "int8")
    assert plan.context_length == 512
    assert plan.kv_bytes == 2 * 2 * 2 * 32 * 512 * 4  # k+v, 2 layers, 2 kv heads, head_dim 32, fp32
    assert plan.bundle_dir == Path("out/demo-android") and plan.zip_path == Path("out/demo-android.zip")
    assert plan.evaluate and not plan.random_weights
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.context_length = 1024
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.options.opset = 19


def test_command_line_overrides_the_recipe_once():
    plan = plan_for(backend="onnx", context_length=256, random_weights=True, seed=3, no_eval=True)
    assert plan.backend_name == "onnx" and plan.name == "demo-android-onnx"
    assert plan.spec.scheme == "int4"  # the onnx backend's default: the recipe's scheme is xnnpack's
    assert plan.options.opset == 18  # filled in by the backend's option check
    assert plan.context_length == 256 and plan.source.random_weights and plan.seed == 3
    assert not plan.evaluate


def test_plan_checks_run_in_a_fixed_order():
    with pytest.raises(UserError, match="unknown quantization scheme '3bit'"):
        plan_for(quant="3bit", context_length=8)  # the scheme is checked before the context length
    with pytest.raises(UserError, match="context length 8 is too small"):
        plan_for(context_length=8, kv_budget_mb=0.0001)
    with pytest.raises(UserError, match="over the 0.0001 MB budget"):
        plan_for(kv_budget_mb=0.0001)


def test_artifact_facts_split_into_manifest_sections():
    facts = {"file": "model.mlpackage", "format": "coreml-mlpackage", "compiled": None, "quantization": {"a": 1}}
    facts["min_os"] = {"ios": "18"}
    artifact = ExportedArtifact.from_facts(facts, scratch=_Scratch())
    assert artifact.manifest == {"file": "model.mlpackage", "format": "coreml-mlpackage", "compiled": None}
    assert artifact.files == ["model.mlpackage"] and artifact.quantization == {"a": 1}
    assert artifact.min_os == {"ios": "18"} and artifact.path(Path("b")) == Path("b/model.mlpackage")
    scratch = artifact.verify_inputs["scratch"]
    artifact.release()
    assert scratch.cleaned and artifact.verify_inputs == {}
    onnx = ExportedArtifact.from_facts({"file": "model.onnx", "format": "x", "files": ["model.onnx", "d"]})
    assert onnx.files == ["model.onnx", "d"] and onnx.manifest["files"] == ["model.onnx", "d"]


class _Scratch:
    cleaned = False

    def cleanup(self) -> None:
        self.cleaned = True


@pytest.mark.parametrize("name", available())
def test_backends_keep_no_state_between_export_and_verify(name):
    """export() hands verify() what it needs in the artifact: neither assigns to ``self``."""
    cls = type(get_backend(name))
    for method in (cls.export, cls.verify):
        tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                is_self = isinstance(target, ast.Attribute) and getattr(target.value, "id", None) == "self"
                assert not is_self, f"{name}.{method.__name__} sets self.{target.attr}"


def test_stages_hand_the_artifact_from_export_to_verify_and_into_the_manifest(tmp_path):
    """The fixed stages with a stand-in backend: verify() gets exactly what export() returned, and
    the manifest's artifact, quantization, min_os and verification sections come from it."""
    from mobile_export.backends import Verification
    from mobile_export.backends.onnx import OnnxBackend
    from mobile_export.build import build_plan
    from mobile_export.console import StepUI

    seen = {}

    class StandIn(OnnxBackend):  # onnx attention: no ExecuTorch custom ops to load
        def export(self, model, info, out_dir, ui):
            (out_dir / "model.onnx").write_bytes(b"not a graph")
            facts = {"file": "model.onnx", "format": "stand-in", "quantization": {"q": 1}, "min_os": {"android": "8"}}
            return ExportedArtifact.from_facts(facts, scratch=_Scratch())

        def verify(self, artifact, folder, ctx, decoder):
            seen["artifact"], seen["scratch"] = artifact, artifact.verify_inputs["scratch"]
            seen["written"] = artifact.path(folder).read_bytes()
            seen["tokenizer_saved"] = (folder / "tokenizer.json").is_file()
            return Verification(details={"stand_in": True})

    plan = plan_for(
        backend="onnx",
        quant="fp32",
        embedding_quant="none",
        context_length=64,
        random_weights=True,
        no_eval=True,
        output_dir=tmp_path,
    )
    plan = dataclasses.replace(plan, backend=StandIn())
    result = build_plan(plan, StepUI(quiet=True))
    assert seen["written"] == b"not a graph" and seen["tokenizer_saved"]
    assert seen["scratch"].cleaned and seen["artifact"].verify_inputs == {}  # released after verify
    manifest = result.manifest
    assert manifest.artifact == {"file": "model.onnx", "format": "stand-in"}
    assert manifest.quantization["q"] == 1 and manifest.quantization["scheme"] == "fp32"
    assert manifest.min_os == {"android": "8"} and manifest.verification["stand_in"] is True
    assert manifest.fidelity == {"status": "skipped", "reason": "not evaluated (--no-eval)"}
    assert manifest.context_length == plan.context_length and manifest.kv_cache_bytes == plan.kv_bytes
    assert "model.onnx" not in manifest.tokenizer.files and "tokenizer.json" in manifest.tokenizer.files
    assert result.bundle == tmp_path / "demo-android-onnx" and result.zip_path.is_file()
