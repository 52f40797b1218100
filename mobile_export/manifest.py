"""``manifest.json`` assembled in one place, from the build plan and the stages' typed results."""

from __future__ import annotations

import datetime as dt
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path

from mobile_export import __version__
from mobile_export.bundle import Manifest, ModelInfo, TokenizerInfo, tree_bytes
from mobile_export.chat import chat_template, end_of_turn_ids
from mobile_export.plan import BuildPlan
from mobile_export.recipes import recipe_hash
from mobile_export.reference import REFERENCE_NAME

VERSIONED_PACKAGES = (
    "torch",
    "executorch",
    "torchao",
    "coremltools",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-genai",
    "transformers",
    "tokenizers",
)


def package_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the artifact."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def quantization_section(plan: BuildPlan, converted, exported, artifact_bytes: int, parameters: int) -> dict:
    """The manifest's ``quantization``: the plan's spec, what quantization did, the artifact's own facts."""
    spec, report = plan.spec, converted.report
    quantization = {
        "scheme": spec.scheme,
        "group_size": spec.group_size if spec.uses_groups else None,
        "embedding": spec.embedding,
        "embedding_group_size": spec.embedding_groups if spec.embedding == "int4" else None,
        "bits_per_weight": round(artifact_bytes * 8 / parameters, 3),
    }
    quantization.update(algorithm=spec.algo, rotate=spec.rotate)
    if spec.group_sizes:
        quantization["group_sizes"] = dict(spec.group_sizes)
    if spec.keep_8bit:
        quantization["keep_8bit"] = {
            "patterns": list(spec.keep_8bit),
            "layers": report.kept_8bit,
            "extra_bytes_estimate": report.extra_bytes_8bit,
        }
    quantization.update(report.details)
    if plan.backend.quantizes_in_torch:
        quantization.update(
            quantized_linears=report.quantized_linears,
            quantized_embeddings=report.quantized_embeddings,
            fp32_linears=report.skipped_linears or [],
        )
    quantization.update(exported.artifact.quantization)
    return quantization


def assemble_manifest(
    plan: BuildPlan, loaded, converted, exported, verified, fidelity, stage: Path, timings
) -> Manifest:
    """The bundle's manifest (files and checksums are added when it is written)."""
    source, artifact = loaded.source, exported.artifact
    tokenizer, bos = source.tokenizer, exported.bos
    not_tokenizer = {*artifact.files, artifact.compiled, REFERENCE_NAME}
    tokenizer_files = sorted(p.name for p in stage.iterdir() if p.name not in not_tokenizer)
    artifact_bytes = sum(tree_bytes(stage / f) for f in artifact.files)
    outcome = verified.outcome
    return Manifest(
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        tool={"name": "mobile-export", "version": __version__},
        versions=package_versions(),
        model=ModelInfo(
            name=plan.recipe.name,
            hf_id=exported.info.hf_id,
            revision=source.revision,
            architecture=plan.recipe.architecture,
            license=plan.recipe.license,
            parameters=source.parameters,
            weights=source.weights,
            path=str(plan.source.model_path.resolve()) if source.weights == "local" else None,
            source_format=source.source_format,
            gguf=source.gguf.manifest_entry() if source.gguf is not None else None,
        ),
        recipe={"name": plan.recipe.name, "sha256": recipe_hash(plan.recipe)},
        target=plan.target,
        backend=plan.backend_name,
        min_os=artifact.min_os,
        artifact=artifact.manifest,
        quantization=quantization_section(plan, converted, exported, artifact_bytes, source.parameters),
        context_length=plan.context_length,
        kv_cache_bytes=plan.kv_bytes,
        inputs=exported.inputs,
        outputs=exported.outputs,
        states=exported.states,
        tokenizer=TokenizerInfo(
            files=tokenizer_files,
            bos_id=bos,
            eos_ids=exported.eos,
            pad_id=exported.pad,
            add_bos=bos is not None and list(tokenizer("a")["input_ids"][:1]) == [bos],  # as encoding does
            chat_template=chat_template(tokenizer),
            end_of_turn_ids=end_of_turn_ids(tokenizer) if source.own_tokenizer else [],
        ),
        verification={
            "protocol": "fixed prompts: one prefill call, then teacher-forced single-token decode steps",
            "sequences": len(loaded.sequences),
            "weights_meaningful": not loaded.random,
            "reference_dtype": str(source.dtype).removeprefix("torch."),
            "comparisons": [c.__dict__ for c in verified.comparisons],
            **outcome.details,
        },
        build={
            "seconds": {k: round(v, 2) for k, v in timings.items()},
            "seed": plan.seed if loaded.random else None,
        },
        fidelity=fidelity.figures,
    )
