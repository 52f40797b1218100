"""The run side's one interface: every loader is a Runtime keyed by the artifact format it opens,
and open_bundle picks it by the manifest's artifact.format (never by the backend's name)."""

from __future__ import annotations

import platform

import pytest
import torch
from fake_bundles import make_manifest

from mobile_export.errors import UserError
from mobile_export.runtimes import LOADERS, Runtime, artifact_format, loader, open_artifact, open_bundle


@pytest.mark.parametrize("fmt", sorted(LOADERS))
def test_every_loader_is_a_runtime_of_its_format(fmt):
    cls = loader(fmt)
    assert issubclass(cls, Runtime) and cls.format == fmt
    assert not cls.__name__.endswith("Decoder")  # the torch module is the decoder, not its loader


def test_format_from_the_manifest_else_from_the_artifact_suffix():
    assert artifact_format({"file": "model.pte", "format": "coreml-mlpackage"}) == "coreml-mlpackage"
    assert artifact_format({"file": "model.pte"}) == "executorch-pte"
    assert artifact_format({"file": "model.onnx", "format": None}) == "onnxruntime-genai"
    assert artifact_format({"file": "model.mlpackage"}) == "coreml-mlpackage"


def test_an_unknown_format_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(UserError, match="unknown artifact format 'executorch-ptx'") as caught:
        open_artifact(tmp_path / "model.ptx", {"file": "model.ptx", "format": "executorch-ptx"})
    assert "executorch-pte" in caught.value.hint and "did you mean 'executorch-pte'" in caught.value.hint


def test_a_core_ml_delegated_pte_is_refused_before_loading(tmp_path):
    artifact = {"file": "model.pte", "format": "executorch-pte", "delegate": "CoreMLBackend"}
    with pytest.raises(UserError, match="model.pte is delegated to Core ML, which runs only on iOS/macOS"):
        open_artifact(tmp_path / "model.pte", artifact)  # the file need not exist: refused first


@pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML runs on macOS")
def test_open_bundle_goes_by_format_not_backend(tmp_path):
    manifest = make_manifest(backend="xnnpack", artifact={"file": "model.pte", "format": "coreml-mlpackage"})
    with pytest.raises(UserError, match="Core ML packages run only on macOS"):
        open_bundle(tmp_path, manifest)


def test_default_logits_all_steps_token_by_token():
    class Counting(Runtime):
        format = "test"

        def __init__(self):
            self.calls = []

        def step(self, tokens, start_pos):
            self.calls.append((list(tokens), start_pos))
            return torch.tensor([float(start_pos), float(tokens[-1])])

    runtime = Counting()
    logits = runtime.logits_all([7, 8, 9], 2)
    assert runtime.calls == [([7], 2), ([8], 3), ([9], 4)]
    assert logits.tolist() == [[2.0, 7.0], [3.0, 8.0], [4.0, 9.0]]
    assert runtime.metadata("get_max_seq_len") is None and runtime.reset() is None
