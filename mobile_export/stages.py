"""The build's fixed stages: load → reference → convert → export → verify → fidelity → bundle.

Each stage takes the :class:`~mobile_export.plan.BuildPlan` and the typed results of earlier
stages and returns its own; the same sequence runs for every backend, which fills in only
export and verify. Memory is kept low for multi-billion-parameter models: the original is
loaded in bf16 when an fp32 copy would not fit, its reference logits are computed first, then
it is converted one decoder layer at a time (cast, quantize, free) into the export wrapper that
reuses its modules; each stage drops what later stages no longer need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mobile_export.backends import ExportedArtifact, ExportInfo, Verification, VerifyContext
from mobile_export.bundle import TensorSpec, check_destination, write_manifest, write_zip
from mobile_export.chat import stop_ids, write_template_to_tokenizer_config
from mobile_export.console import StepUI
from mobile_export.errors import UserError, VerificationError
from mobile_export.fidelity import build_eval_reference, read_text
from mobile_export.memory import release_memory
from mobile_export.plan import BuildPlan
from mobile_export.preflight import check_memory
from mobile_export.quant_algos.calibration import Calibration, load_calibration
from mobile_export.quant_algos.pipeline import quantize_decoder
from mobile_export.quantize import CALIBRATED, QuantReport, QuantSpec
from mobile_export.recipes import Recipe
from mobile_export.reference import ReferenceFile, build_reference, write_reference
from mobile_export.sources import Source, load_source
from mobile_export.verify import Comparison, enforce, judge_fidelity, reference_logits, stepped_logits, token_sequences


@dataclass
class Loaded:
    """The original model and tokenizer (``source``), and the fixed token sequences compared."""

    source: Source
    vocab_size: int
    sequences: list[list[int]]

    @property
    def random(self) -> bool:
        return self.source.weights == "random"

    def encode(self, text: str) -> list[int]:
        return self.source.tokenizer(text)["input_ids"]


@dataclass
class References:
    """The original model's figures: logits on the fixed sequences, the bundle's reference.json
    and the fidelity text's reference (None with ``--no-eval``)."""

    logits: list[torch.Tensor]
    device_reference: ReferenceFile
    eval_text: object = None  # fidelity.EvalReference; released after the fidelity stage


@dataclass
class Converted:
    """The export-ready decoder, what quantization did, and (torch-side quantization) the same
    quantized model's eager logits, which the lowered artifact must match."""

    decoder: torch.nn.Module | None
    report: QuantReport
    lowering_ref: list[torch.Tensor] | None = None
    calibration: Calibration | None = None


@dataclass
class Exported:
    """The written artifact, its metadata and its tensors, and the special token ids."""

    artifact: ExportedArtifact
    info: ExportInfo
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    states: list[TensorSpec]
    bos: int | None
    eos: list[int]
    pad: int | None


@dataclass
class Verified:
    """The backend's verification and every comparison (the fidelity stage may add one)."""

    outcome: Verification
    comparisons: list[Comparison] = field(default_factory=list)


@dataclass
class Fidelity:
    """The artifact's figures on the fidelity text (or why it was skipped)."""

    figures: dict


def preflight(plan: BuildPlan) -> None:
    """Checks of this machine and the file system, before any heavy work."""
    check_memory(plan.recipe.config, plan.kv_bytes)
    check_destination(plan.bundle_dir, plan.force)
    if plan.eval_text is not None and plan.evaluate:
        read_text(plan.eval_text, "eval text")


def load(plan: BuildPlan, ui: StepUI) -> Loaded:
    """Load the original model and tokenizer; the fixed sequences in the model's vocabulary."""
    with ui.step(f"Load {plan.recipe.name}"):
        source = load_source(plan.recipe, plan.source)
    for note in source.notes:
        ui.note(note)
    vocab_size = int(source.model.config.vocab_size)
    sequences = token_sequences(lambda text: source.tokenizer(text)["input_ids"], plan.context_length)
    sequences = [[min(t, vocab_size - 1) for t in seq] for seq in sequences]
    return Loaded(source=source, vocab_size=vocab_size, sequences=sequences)


def reference(plan: BuildPlan, loaded: Loaded, ui: StepUI) -> References:
    """The original model's logits, device reference and fidelity reference."""
    model = loaded.source.model
    with ui.step("Reference logits from the original model"):
        logits = reference_logits(model, loaded.sequences)
    eval_text = None
    with ui.step("Fidelity references from the original model"):
        device_reference = build_reference(
            model,
            loaded.encode,
            max_seq_len=plan.context_length,
            spec=plan.spec,
            weights_meaningful=not loaded.random,
        )
        if plan.evaluate:
            eval_text = build_eval_reference(model, loaded.encode, plan.eval_text, plan.context_length)
    return References(logits=logits, device_reference=device_reference, eval_text=eval_text)


def convert_stage(plan: BuildPlan, loaded: Loaded, ui: StepUI) -> Converted:
    """Calibrate (GPTQ/AWQ), wrap and quantize the original model; the original is released."""
    spec, backend = plan.spec, plan.backend
    calibration = None
    if spec.algo in CALIBRATED:
        calibration = load_calibration(
            plan.calib_text, loaded.encode, spec.algo, plan.context_length, loaded.vocab_size
        )
        ui.note(
            f"calibration: {calibration.tokens} tokens of {calibration.path.name} in {len(calibration.windows)} windows"
        )
    with ui.step(f"Prepare and quantize ({spec.label})"):
        decoder, report = convert(loaded.source.model, spec, plan.context_length, backend, ui, calibration)
        lowering_ref = None
        if spec.is_quantized and backend.quantizes_in_torch:
            ui.update("eager run of the quantized model")
            lowering_ref = stepped_logits(decoder.step, loaded.sequences)
            decoder.reset_cache()
    if report.skipped_linears:
        ui.note(f"{len(report.skipped_linears)} linear layers kept in fp32: {report.skipped_linears[0]} ...")
    if report.kept_8bit:
        cost = f": about {report.extra_bytes_8bit / 1e6:.2f} MB more" if report.extra_bytes_8bit else ""
        ui.note(
            f"{len(report.kept_8bit)} layers kept at 8 bits ({', '.join(report.kept_8bit[:3])}"
            f"{' ...' if len(report.kept_8bit) > 3 else ''}){cost}"
        )
    loaded.source.model = None  # the decoder holds the modules it reuses
    release_memory()
    return Converted(decoder=decoder, report=report, lowering_ref=lowering_ref, calibration=calibration)


def convert(
    source_model: torch.nn.Module,
    spec: QuantSpec,
    max_seq_len: int,
    backend,
    ui: StepUI,
    calibration: Calibration | None = None,
):
    """Wrap the original model for export, one decoder layer at a time: rotate (``--rotate``),
    cast to the backend's dtype, and quantize with torchao when the backend takes torch-side
    quantization, choosing the integers with ``spec.algo`` (GPTQ/AWQ from ``calibration``)."""
    from mobile_export.modeling import ExportableDecoder

    decoder = ExportableDecoder(source_model, max_seq_len, attention=backend.attention).eval()
    report = QuantReport()
    quantize_decoder(decoder, spec, report, backend, ui, calibration)
    decoder.prepare_for_export()
    if not backend.quantizes_in_torch:
        decoder.to(backend.weight_dtype)
    release_memory()
    return decoder, report


def special_ids(
    tokenizer, recipe: Recipe, own_tokenizer: bool, generation_eos=()
) -> tuple[int | None, list[int], int | None]:
    """BOS, every stop id and PAD id for the runner metadata and manifest.

    With the model's own tokenizer the stop ids are the recipe's (config + generation config),
    the model's generation_config, the tokenizer's EOS and the chat template's end-of-turn
    token; with the demo tokenizer substituted for a random-weight build only its own EOS.
    """
    known = [*recipe.eos_ids(), *generation_eos] if own_tokenizer else []
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    eos = stop_ids(tokenizer, known, [tok_eos] if tok_eos is not None else [])
    return getattr(tokenizer, "bos_token_id", None), eos, getattr(tokenizer, "pad_token_id", None)


def export(plan: BuildPlan, loaded: Loaded, converted: Converted, stage: Path, ui: StepUI) -> Exported:
    """Export the decoder with the backend into ``stage``, then save the tokenizer next to it."""
    source, backend, decoder = loaded.source, plan.backend, converted.decoder
    bos, eos, pad = special_ids(source.tokenizer, plan.recipe, source.own_tokenizer, source.generation_eos_ids)
    info = ExportInfo(
        model_name=plan.recipe.name,
        hf_id=source.hf_id or plan.recipe.hf_id,
        revision=source.revision,
        license=plan.recipe.license,
        max_seq_len=plan.context_length,
        vocab_size=loaded.vocab_size,
        n_layers=len(decoder.layers),
        bos_id=bos,
        eos_ids=eos,
        spec=plan.spec,
        options=plan.options,
    )
    inputs, outputs, states = backend.tensor_specs(decoder, loaded.vocab_size)
    with ui.step(f"Export and convert ({backend.name})"):
        artifact = backend.export(decoder, info, stage, ui)
    del decoder
    if not backend.keeps_model:
        converted.decoder = None
    release_memory()
    source.tokenizer.save_pretrained(str(stage))
    write_template_to_tokenizer_config(stage, source.tokenizer)
    return Exported(artifact, info, inputs, outputs, states, bos, eos, pad)


def verify(
    plan: BuildPlan,
    loaded: Loaded,
    refs: References,
    converted: Converted,
    exported: Exported,
    stage: Path,
    ui: StepUI,
) -> Verified:
    """The backend checks its artifact against the original; failures stop the build unless
    ``--keep-unverified``."""
    with ui.step("Verify artifact against the original model"):
        ctx = VerifyContext(
            sequences=loaded.sequences,
            reference=refs.logits,
            lowering_ref=converted.lowering_ref,
            tokenizer=loaded.source.tokenizer,
            eos_ids=exported.eos,
            spec=plan.spec,
            weights_meaningful=not loaded.random,
            reference_dtype=loaded.source.dtype,
            ui=ui,
        )
        try:
            outcome = plan.backend.verify(exported.artifact, stage, ctx, converted.decoder)
        finally:
            exported.artifact.release()
    converted.decoder = None
    release_memory()
    comparisons = outcome.comparisons
    for comparison in comparisons:
        status = "ok" if comparison.passed else ("FAILED" if comparison.enforced else "recorded, not enforced")
        ui.note(f"{comparison.summary()} [{status}]")
    for note in outcome.notes:
        ui.note(note)
    enforce(comparisons, plan.keep_unverified)
    failures = [*outcome.failures, *check_reference(plan, refs, exported, stage, ui)]
    if failures and not plan.keep_unverified:
        raise VerificationError(
            f"verification failed: {failures[0]}",
            hint="nothing was written; pass --keep-unverified to write the bundle anyway",
        )
    return Verified(outcome=outcome, comparisons=comparisons)


def check_reference(plan: BuildPlan, refs: References, exported: Exported, stage: Path, ui: StepUI) -> list[str]:
    """The bundle's own ``reference.json`` check (what ``verify`` and the device harnesses run),
    on the artifact in its host runtime where it runs here: a build never writes a bundle that
    fails it. Returns the failures (none when not enforced or not runnable here)."""
    from mobile_export.reference import check_artifact

    artifact = exported.artifact
    try:  # the manifest's own artifact entry: exactly what ``verify`` will open
        report = check_artifact(artifact.path(stage), artifact.manifest, refs.device_reference)
    except UserError as exc:
        ui.note(f"reference.json check: not run here ({exc.message})")
        return []
    worst = min(p.top1_agreement for p in report.prompts) if report.prompts else 1.0
    status = "ok" if not report.failures else ("FAILED" if report.enforced else "recorded, not enforced")
    ui.note(f"reference.json check: greedy agreement >= {worst:.0%} on {len(report.prompts)} prompts [{status}]")
    return [f"reference.json check: {line}" for line in report.failures] if report.enforced else []


def fidelity(
    plan: BuildPlan, loaded: Loaded, refs: References, exported: Exported, verified: Verified, stage: Path, ui: StepUI
) -> Fidelity:
    """The artifact (or the verification's stand-in) on the fidelity text; its quantization
    cost is judged and, with meaningful weights, enforced."""
    figures = {"status": "skipped", "reason": "not evaluated (--no-eval)"}
    eval_text = refs.eval_text
    if eval_text is not None:
        with ui.step(f"Fidelity on {eval_text.name}"):
            figures, quality = judge_fidelity(
                plan.backend, exported.artifact.path(stage), eval_text, verified.outcome, plan.spec, not loaded.random
            )
        for line in figures.pop("notes"):
            ui.note(line)
        if quality is not None:
            verified.comparisons.append(quality)
            enforce([quality], plan.keep_unverified)
    del eval_text
    refs.eval_text = None
    verified.outcome.stand_in = None
    release_memory()
    return Fidelity(figures=figures)


def bundle(
    plan: BuildPlan,
    loaded: Loaded,
    refs: References,
    converted: Converted,
    exported: Exported,
    verified: Verified,
    fidelity_result: Fidelity,
    stage: Path,
    ui: StepUI,
):
    """Write reference.json and the manifest (assembled from the stages' results), then the zip.
    Returns the manifest and the zip's path."""
    from mobile_export.manifest import assemble_manifest

    write_reference(stage, refs.device_reference)
    with ui.step("Write bundle"):
        manifest = assemble_manifest(plan, loaded, converted, exported, verified, fidelity_result, stage, ui.timings)
        write_manifest(stage, manifest)
        zip_path = write_zip(stage, plan.zip_path)
    return manifest, zip_path
