"""The build pipeline: load → reference → prepare + quantize → export + lower → verify → bundle.

The same fixed sequence for every backend; a backend fills in only export and open. Memory is
kept low for multi-billion-parameter models: the original is loaded in bf16 when an fp32 copy
would not fit, its reference logits are computed first, then it is converted one decoder
layer at a time (cast, quantize, free) into the export wrapper that reuses its modules.
"""

from __future__ import annotations

import datetime as dt
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch

from mobile_export import __version__
from mobile_export.bundle import (
    Manifest,
    ModelInfo,
    TokenizerInfo,
    bundle_name,
    check_destination,
    staged_bundle,
    tree_bytes,
    write_manifest,
    write_zip,
)
from mobile_export.chat import chat_template, end_of_turn_ids, stop_ids, write_template_to_tokenizer_config
from mobile_export.console import StepUI
from mobile_export.errors import UserError, VerificationError
from mobile_export.fidelity import build_eval_reference, read_text
from mobile_export.memory import release_memory
from mobile_export.preflight import check_memory, read_config_json
from mobile_export.quant_algos.calibration import Calibration, load_calibration
from mobile_export.quant_algos.pipeline import quantize_decoder
from mobile_export.quant_algos.support import check_algorithm_support
from mobile_export.quantize import CALIBRATED, QuantReport, QuantSpec
from mobile_export.recipes import Recipe, load_recipe, recipe_from_model_config, recipe_hash
from mobile_export.reference import REFERENCE_NAME, build_reference, write_reference
from mobile_export.sources import SourceOptions, load_source
from mobile_export.targets import BackendOptions, ExportInfo, VerifyContext, get_backend
from mobile_export.verify import Comparison, enforce, judge_fidelity, reference_logits, stepped_logits, token_sequences

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


@dataclass
class BuildRequest:
    """Everything ``mobile-export build`` was asked to do."""

    recipe: str | None
    target: str
    model_path: Path | None = None
    backend: str | None = None
    quant: str | None = None
    group_size: int | None = None
    embedding_quant: str | None = None
    embedding_group_size: int | None = None
    context_length: int | None = None
    output_dir: Path = Path("dist")
    force: bool = False
    random_weights: bool = False
    seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    keep_unverified: bool = False
    revision: str | None = None
    compute_units: str | None = None
    min_ios: str | None = None
    kv_budget_mb: float | None = None
    compile_mlmodelc: bool = False
    opset: int | None = None
    min_onnxruntime: str | None = None
    quant_algo: str | None = None
    calib_text: Path | None = None
    rotate: bool | None = None
    keep_8bit: tuple[str, ...] = ()
    group_size_for: tuple[str, ...] = ()  # "PATTERN=N", as typed
    eval_text: Path | None = None
    no_eval: bool = False


@dataclass
class BuildResult:
    """What a build wrote and measured."""

    bundle: Path
    zip_path: Path
    manifest: Manifest
    comparisons: list[Comparison] = field(default_factory=list)
    seconds: float = 0.0


def package_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the artifact."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolve_recipe(request: BuildRequest) -> Recipe:
    """The recipe named, or one made from a local folder's config.json with target defaults."""
    if request.recipe:
        return load_recipe(request.recipe)
    if request.model_path is None:
        raise UserError("nothing to build", hint="name a recipe, or pass --model-path DIR")
    if not request.model_path.exists():
        what = "GGUF file" if request.model_path.suffix == ".gguf" else "model folder"
        raise UserError(f"{what} {request.model_path} does not exist")
    from mobile_export.gguf_source import find_gguf, gguf_config

    gguf = find_gguf(request.model_path)
    if gguf is not None:
        config = gguf_config(gguf).to_dict()
        stem = gguf.stem
    elif not request.model_path.is_dir():
        raise UserError(
            f"model path {request.model_path} is not a folder",
            hint="pass a Hugging Face model folder or a .gguf file",
        )
    else:
        config = read_config_json(request.model_path)
        stem = request.model_path.resolve().name
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    return recipe_from_model_config(config, name)


def quant_spec(recipe: Recipe, request: BuildRequest, backend) -> QuantSpec:
    """The recipe's quantization for the target (or the backend's default when the user picked
    another backend than the recipe's), with command-line overrides applied."""
    target = recipe.target(request.target)
    settings = target.quant_for(backend.name) or backend.default_quant
    scheme = request.quant if request.quant is not None else settings.scheme
    backend.check(request.target, scheme)
    embedding = request.embedding_quant if request.embedding_quant is not None else settings.embedding
    group_size = request.group_size if request.group_size is not None else settings.group_size
    if request.embedding_group_size is not None:
        embedding_groups = request.embedding_group_size
    elif request.embedding_quant is None and request.group_size is None:
        embedding_groups = settings.embedding_group_size
    else:  # the user changed the embedding or the groups: the recipe's embedding groups no longer apply
        embedding_groups = None
    # the recipe's algorithm, 8-bit layers and groups were chosen for its scheme: another --quant drops them
    own_scheme = scheme == settings.scheme
    spec = QuantSpec(
        scheme=scheme,
        group_size=group_size,
        embedding=embedding,
        weight_only=backend.weight_only,
        algo=request.quant_algo if request.quant_algo is not None else ((own_scheme and settings.algo) or "rtn"),
        rotate=request.rotate if request.rotate is not None else bool(own_scheme and settings.rotate),
        keep_8bit=tuple(request.keep_8bit) or (tuple(settings.keep_8bit or ()) if own_scheme else ()),
        embedding_group_size=embedding_groups if embedding == "int4" else None,
        group_sizes=parse_group_sizes(request.group_size_for)
        if request.group_size_for
        else (tuple((settings.group_sizes or {}).items()) if own_scheme and request.group_size is None else ()),
    )
    check_algorithm_support(backend, spec, request.calib_text)
    return spec


def parse_group_sizes(values: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``--group-size-for PATTERN=N`` values as (pattern, N) pairs."""
    pairs = []
    for value in values:
        pattern, _, size = value.rpartition("=")
        if not pattern or not size.strip().isdigit():
            raise UserError(
                f"--group-size-for '{value}' is not PATTERN=N",
                hint="e.g. --group-size-for 're:layers\\.\\d+\\.mlp\\.(gate|up)_proj=64'",
            )
        pairs.append((pattern, int(size)))
    return tuple(pairs)


def context_length(recipe: Recipe, request: BuildRequest) -> int:
    """KV-cache length: the command line's or the recipe's, checked against the model."""
    length = request.context_length if request.context_length is not None else recipe.context_length
    max_positions = recipe.config.get("max_position_embeddings")
    if length < 32:
        raise UserError(f"context length {length} is too small", hint="use at least 32 tokens")
    if isinstance(max_positions, int) and length > max_positions:
        raise UserError(
            f"context length {length} exceeds the model's {max_positions} positions",
            hint=f"use --context-length {max_positions} or less",
        )
    return length


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
    tokenizer, recipe: Recipe, own_tokenizer: bool, generation_eos: Sequence[int] = ()
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


def kv_cache_bytes(config: dict, max_seq_len: int, bytes_per_value: int) -> int | None:
    """Bytes of a static KV cache for a transformers config dict (keys and values, every layer);
    None when the config lacks the usual keys (the architecture check then explains)."""
    if not all(k in config for k in ("num_attention_heads", "num_hidden_layers", "hidden_size")):
        return None
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return 2 * int(config["num_hidden_layers"]) * kv_heads * head_dim * max_seq_len * bytes_per_value


def check_kv_budget(recipe: Recipe, request: BuildRequest, max_seq_len: int, backend) -> int | None:
    """The KV cache's size in bytes, refused when above the budget (command line, else recipe)."""
    budget = request.kv_budget_mb if request.kv_budget_mb is not None else recipe.target(request.target).kv_budget_mb
    size = kv_cache_bytes(recipe.config, max_seq_len, torch.finfo(backend.cache_dtype).bits // 8)
    if budget is not None and size is not None and size > budget * 2**20:
        fits = max(1, int(budget * 2**20 // (size // max_seq_len)))
        raise UserError(
            f"the KV cache needs {size / 2**20:.3g} MB for {max_seq_len} tokens, over the {budget:g} MB budget",
            hint=f"use --context-length {fits} or less, or raise --kv-budget-mb",
        )
    return size


def backend_options(recipe: Recipe, request: BuildRequest, backend) -> BackendOptions:
    """Compute units and deployment target: command line first, then the recipe's target (whose
    values are for its own backend, so they are dropped when another backend takes no options)."""
    settings = recipe.target(request.target)
    onnx = {"opset": request.opset, "min_onnxruntime": request.min_onnxruntime}
    if "compute_units" not in backend.option_names:
        return BackendOptions(
            compute_units=request.compute_units,
            deployment_target=request.min_ios,
            compile_mlmodelc=request.compile_mlmodelc or None,
            **onnx,
        )
    return BackendOptions(
        compute_units=request.compute_units or settings.compute_units,
        deployment_target=request.min_ios or settings.min_ios,
        compile_mlmodelc=request.compile_mlmodelc or None,
        **onnx,
    )


def build(request: BuildRequest, ui: StepUI) -> BuildResult:
    """Run the whole pipeline and return where the bundle went."""
    started = time.perf_counter()
    recipe = resolve_recipe(request)
    settings = recipe.target(request.target)
    backend_name = request.backend or settings.backend
    backend = get_backend(backend_name)
    spec = quant_spec(recipe, request, backend)
    options = backend.check_options(backend_options(recipe, request, backend), spec)
    max_seq_len = context_length(recipe, request)
    kv_bytes = check_kv_budget(recipe, request, max_seq_len, backend)
    check_memory(recipe.config, kv_bytes)
    name = bundle_name(recipe.name, request.target, backend.name, settings.backend)
    final_dir = request.output_dir / name
    check_destination(final_dir, request.force)
    if request.eval_text is not None and not request.no_eval:
        read_text(request.eval_text, "eval text")
    source_options = SourceOptions(
        model_path=request.model_path,
        random_weights=request.random_weights,
        seed=request.seed,
        allow_pickle=request.allow_pickle,
        trust_remote_code=request.trust_remote_code,
        revision=request.revision,
    )

    with ui.step(f"Load {recipe.name}"):
        source = load_source(recipe, source_options)
    for note in source.notes:
        ui.note(note)
    tokenizer = source.tokenizer
    vocab_size = int(source.model.config.vocab_size)
    sequences = token_sequences(lambda text: tokenizer(text)["input_ids"], max_seq_len)
    sequences = [[min(t, vocab_size - 1) for t in seq] for seq in sequences]

    with ui.step("Reference logits from the original model"):
        reference = reference_logits(source.model, sequences)

    eval_text = None
    with ui.step("Fidelity references from the original model"):
        encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
        device_reference = build_reference(
            source.model,
            encode,
            max_seq_len=max_seq_len,
            spec=spec,
            weights_meaningful=source.weights != "random",
        )
        if not request.no_eval:
            eval_text = build_eval_reference(source.model, encode, request.eval_text, max_seq_len)

    calibration = None
    if spec.algo in CALIBRATED:
        calibration = load_calibration(
            request.calib_text, lambda text: tokenizer(text)["input_ids"], spec.algo, max_seq_len, vocab_size
        )
        ui.note(
            f"calibration: {calibration.tokens} tokens of {calibration.path.name} in {len(calibration.windows)} windows"
        )

    with ui.step(f"Prepare and quantize ({spec.label})"):
        decoder, report = convert(source.model, spec, max_seq_len, backend, ui, calibration)
        lowering_ref = None
        if spec.is_quantized and backend.quantizes_in_torch:
            ui.update("eager run of the quantized model")
            lowering_ref = stepped_logits(decoder.step, sequences)
            decoder.reset_cache()
    if report.skipped_linears:
        ui.note(f"{len(report.skipped_linears)} linear layers kept in fp32: {report.skipped_linears[0]} ...")
    if report.kept_8bit:
        cost = f": about {report.extra_bytes_8bit / 1e6:.2f} MB more" if report.extra_bytes_8bit else ""
        ui.note(
            f"{len(report.kept_8bit)} layers kept at 8 bits ({', '.join(report.kept_8bit[:3])}"
            f"{' ...' if len(report.kept_8bit) > 3 else ''}){cost}"
        )
    del source.model
    release_memory()

    bos, eos, pad = special_ids(tokenizer, recipe, source.own_tokenizer, source.generation_eos_ids)
    hf_id = source.hf_id or recipe.hf_id
    info = ExportInfo(
        model_name=recipe.name,
        hf_id=hf_id,
        revision=source.revision,
        license=recipe.license,
        max_seq_len=max_seq_len,
        vocab_size=vocab_size,
        n_layers=len(decoder.layers),
        bos_id=bos,
        eos_ids=eos,
        spec=spec,
        options=options,
    )
    inputs, outputs, states = backend.tensor_specs(decoder, vocab_size)
    parameters = source.parameters
    random = source.weights == "random"

    with staged_bundle(final_dir, request.force) as stage:
        with ui.step(f"Export and convert ({backend.name})"):
            artifact = backend.export(decoder, info, stage, ui)
        if not backend.keeps_model:
            del decoder
            decoder = None
        release_memory()

        tokenizer.save_pretrained(str(stage))
        write_template_to_tokenizer_config(stage, tokenizer)
        with ui.step("Verify artifact against the original model"):
            ctx = VerifyContext(
                sequences=sequences,
                reference=reference,
                lowering_ref=lowering_ref,
                tokenizer=tokenizer,
                eos_ids=eos,
                spec=spec,
                weights_meaningful=not random,
                reference_dtype=source.dtype,
                ui=ui,
            )
            outcome = backend.verify(ctx, stage / artifact["file"], decoder)
        del decoder
        release_memory()
        comparisons = outcome.comparisons
        for comparison in comparisons:
            status = "ok" if comparison.passed else ("FAILED" if comparison.enforced else "recorded, not enforced")
            ui.note(f"{comparison.summary()} [{status}]")
        for note in outcome.notes:
            ui.note(note)
        enforce(comparisons, request.keep_unverified)
        if outcome.failures and not request.keep_unverified:
            raise VerificationError(
                f"verification failed: {outcome.failures[0]}",
                hint="nothing was written; pass --keep-unverified to write the bundle anyway",
            )

        fidelity = {"status": "skipped", "reason": "not evaluated (--no-eval)"}
        if eval_text is not None:
            with ui.step(f"Fidelity on {eval_text.name}"):
                fidelity, quality = judge_fidelity(
                    backend, stage / artifact["file"], eval_text, outcome, spec, not random
                )
            for line in fidelity.pop("notes"):
                ui.note(line)
            if quality is not None:
                comparisons.append(quality)
                enforce([quality], request.keep_unverified)
        del eval_text
        outcome.stand_in = None
        release_memory()
        write_reference(stage, device_reference)

        with ui.step("Write bundle"):
            artifact_files = artifact.get("files") or [artifact["file"]]
            artifacts = {*artifact_files, artifact.get("compiled"), REFERENCE_NAME}
            tokenizer_files = sorted(p.name for p in stage.iterdir() if p.name not in artifacts)
            artifact_bytes = sum(tree_bytes(stage / f) for f in artifact_files)
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
            if backend.quantizes_in_torch:
                quantization.update(
                    quantized_linears=report.quantized_linears,
                    quantized_embeddings=report.quantized_embeddings,
                    fp32_linears=report.skipped_linears or [],
                )
            quantization.update(artifact.pop("quantization", {}))
            manifest = Manifest(
                created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                tool={"name": "mobile-export", "version": __version__},
                versions=package_versions(),
                model=ModelInfo(
                    name=recipe.name,
                    hf_id=hf_id,
                    revision=source.revision,
                    architecture=recipe.architecture,
                    license=recipe.license,
                    parameters=parameters,
                    weights=source.weights,
                    path=str(request.model_path.resolve()) if source.weights == "local" else None,
                    source_format=source.source_format,
                    gguf=source.gguf.manifest_entry() if source.gguf is not None else None,
                ),
                recipe={"name": recipe.name, "sha256": recipe_hash(recipe)},
                target=request.target,
                backend=backend.name,
                min_os=artifact.pop("min_os", {}),
                artifact=artifact,
                quantization=quantization,
                context_length=max_seq_len,
                kv_cache_bytes=kv_bytes,
                inputs=inputs,
                outputs=outputs,
                states=states,
                tokenizer=TokenizerInfo(
                    files=tokenizer_files,
                    bos_id=bos,
                    eos_ids=eos,
                    pad_id=pad,
                    add_bos=bos is not None and list(tokenizer("a")["input_ids"][:1]) == [bos],  # as encoding does
                    chat_template=chat_template(tokenizer),
                    end_of_turn_ids=end_of_turn_ids(tokenizer) if source.own_tokenizer else [],
                ),
                verification={
                    "protocol": "fixed prompts: one prefill call, then teacher-forced single-token decode steps",
                    "sequences": len(sequences),
                    "weights_meaningful": not random,
                    "reference_dtype": str(source.dtype).removeprefix("torch."),
                    "comparisons": [c.__dict__ for c in comparisons],
                    **outcome.details,
                },
                build={
                    "seconds": {k: round(v, 2) for k, v in ui.timings.items()},
                    "seed": request.seed if random else None,
                },
                fidelity=fidelity,
            )
            write_manifest(stage, manifest)
            zip_path = write_zip(stage, request.output_dir / f"{name}.zip")
    return BuildResult(
        bundle=final_dir,
        zip_path=zip_path,
        manifest=manifest,
        comparisons=comparisons,
        seconds=time.perf_counter() - started,
    )
