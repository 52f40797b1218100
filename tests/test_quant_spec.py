"""A quantization spec written into a manifest reads back as the same spec, and every consumer of
a bundle's quantization (``eval``'s label, ``sensitivity``'s stand-in) reads it the one way."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mobile_export.errors import UserError
from mobile_export.evaluate import quant_label
from mobile_export.manifest import quantization_section
from mobile_export.quant_algos.sensitivity import spec_for_bundle
from mobile_export.quantize import QuantReport, QuantSpec, embedding_entry

SPECS = [
    QuantSpec(scheme="8da4w", group_size=32, embedding="int8"),
    QuantSpec(scheme="8da4w", group_size=64, embedding="int4", algo="hqq", embedding_group_size=192),
    QuantSpec(
        scheme="8da4w",
        embedding="int4",
        algo="gptq",
        rotate=True,
        keep_8bit=("lm_head", "re:layers\\.\\d+\\.self_attn\\.v_proj"),
    ),
    QuantSpec(scheme="int4", group_size=128, embedding="none", group_sizes=(("lm_head", 32), ("layers.0.*", 64))),
    QuantSpec(scheme="int8", embedding="int4"),
    QuantSpec(scheme="palettize4"),
    QuantSpec(scheme="fp32"),
]


def _section(spec: QuantSpec, artifact_quantization: dict | None = None) -> dict:
    plan = SimpleNamespace(spec=spec, backend=SimpleNamespace(quantizes_in_torch=True))
    report = QuantReport(quantized_linears=3, kept_8bit=["lm_head"] if spec.keep_8bit else [], details={"hqq": {}})
    exported = SimpleNamespace(artifact=SimpleNamespace(quantization=artifact_quantization or {}))
    return quantization_section(plan, SimpleNamespace(report=report), exported, artifact_bytes=1000, parameters=100)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_the_manifest_section_reads_back_as_the_spec(spec):
    assert QuantSpec.from_manifest(_section(spec)) == spec


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_eval_labels_a_bundle_as_build_labelled_its_spec(spec):
    manifest = SimpleNamespace(quantization=_section(spec))  # all quant_label reads of a Manifest
    assert quant_label(manifest) == spec.label


def test_an_embedding_shared_with_the_head_reads_as_its_scheme():
    spec = QuantSpec(scheme="int4", group_size=32, embedding="int4")
    section = _section(spec, {"embedding": embedding_entry("int4", shared_with_head=True)})
    assert section["embedding"] != "int4"  # the manifest says it is shared
    assert QuantSpec.from_manifest(section).embedding == "int4"
    stand_in, notes = spec_for_bundle(section, "coreml")
    assert stand_in.embedding == "int4" and stand_in.weight_only
    assert any("weight-only int4" in note for note in notes)


def test_sensitivity_stands_in_without_what_it_ranks_or_cannot_redo():
    spec = SPECS[2]  # gptq + rotate + keep-8bit
    stand_in, notes = spec_for_bundle(_section(spec), "xnnpack")
    assert (stand_in.algo, stand_in.rotate, stand_in.keep_8bit) == ("rtn", False, ())
    assert (stand_in.scheme, stand_in.group_size, stand_in.embedding) == ("8da4w", 32, "int4")
    assert not stand_in.weight_only
    assert any("gptq" in note for note in notes) and any("rotation" in note for note in notes)


def test_a_section_no_spec_could_write_is_a_user_error():
    with pytest.raises(UserError, match="unknown embedding quantization 'int3'"):
        QuantSpec.from_manifest({"scheme": "8da4w", "group_size": 32, "embedding": "int3"})
    with pytest.raises(UserError, match="unsupported group size 48"):
        QuantSpec.from_manifest({"scheme": "8da4w", "group_size": 48})
