"""Core ML: a stateful ``.mlpackage`` (iOS 18+) converted with coremltools from the portable decoder.

Program: ``main(input_ids: int32[1, T], causal_mask: fp16[1, 1, T, end]) -> logits: fp16[1, vocab]``
with one fp16 state per layer for keys and one for values ([1, kv_heads, context, head_dim]).
The T tokens sit at positions ``end - T .. end - 1``; both T and ``end`` are flexible ranges
(``RangeDim(1, context)``), so one model does prefill of any length and single-token decode,
and the app builds the additive mask (0 where a query may attend, -inf elsewhere).
Range shapes rather than enumerated ones: ``end`` grows by one every decode step, so an
enumerated set would need one entry per position. The price is that Core ML runs flexible
shapes on CPU/GPU; the Neural Engine wants fixed shapes (a later, separate static variant).

Conversion traces the decoder with TorchScript (coremltools' supported route for stateful
programs with slice updates), converts in fp16, then compresses weights on the MIL program:
``int4`` per-block (block 32 by default), ``int8`` per-channel, ``palettize4`` / ``palettize6``
(k-means lookup tables per group of 16 output channels).

On Linux ``MLModel.predict`` does not exist; verification reads the saved package back
(spec + MIL program) and runs the package's own weights in PyTorch (see :meth:`verify`).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import torch

from mobile_export.backends import (
    COREML_OPTIONS,
    Backend,
    BackendOptions,
    ExportedArtifact,
    ExportInfo,
    Verification,
    VerifyContext,
    register,
)
from mobile_export.backends.coreml_checks import (
    WEIGHT_THRESHOLD,
    check_compression,
    check_io,
    embedding_storage,
    load_package_weights,
    read_package,
)
from mobile_export.errors import UserError
from mobile_export.memory import release_memory
from mobile_export.quantize import ALGORITHMS, embedding_entry
from mobile_export.recipes import QuantSettings
from mobile_export.runtimes.coreml import CoreMLRuntime, import_coremltools, quiet_coremltools, state_name
from mobile_export.verify import FP16_WEIGHT_THRESHOLDS, compare, standard_comparisons, stepped_logits

# The oldest iOS each feature needs; every package has state (the KV cache), hence 18.
FEATURE_MIN_IOS: dict[str, int] = {
    "KV cache as Core ML state": 18,
    "int4 per-block weights": 18,
    "palettized weights per channel group": 18,
    "int8 per-channel weights": 16,
    "fp16 ML program": 15,
}
SCHEME_FEATURE = {
    "int4": "int4 per-block weights",
    "palettize4": "palettized weights per channel group",
    "palettize6": "palettized weights per channel group",
    "int8": "int8 per-channel weights",
    "fp16": "fp16 ML program",
}
DEFAULT_MIN_IOS = "18"
DEFAULT_COMPUTE_UNITS = "cpu_and_gpu"
PALETTE_GROUP = 16  # output channels sharing one lookup table


def ios_major(value: str) -> int:
    """'18' or '18.0' -> 18, with a clear error for anything else."""
    try:
        return int(str(value).split(".")[0])
    except ValueError:
        raise UserError(f"minimum iOS '{value}' is not a version", hint="pass e.g. --min-ios 18") from None


def tied_embedding(decoder) -> bool:
    """Whether the LM head and the embedding share one weight tensor."""
    return decoder.lm_head.weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()


def compression_config(spec, ct, tied: bool = False):
    """coremltools op configs for a scheme: linear weights by the scheme, the embedding by its own
    setting (a table shared with the LM head is one weight: it takes the head's compression)."""
    cto = ct.optimize.coreml

    def linear_quant(dtype: str):
        if dtype == "int4":
            return cto.OpLinearQuantizerConfig(
                mode="linear_symmetric",
                dtype="int4",
                granularity="per_block",
                block_size=spec.group_size,
                weight_threshold=WEIGHT_THRESHOLD,
            )
        return cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD
        )

    if spec.scheme in ("int4", "int8"):
        linear = linear_quant(spec.scheme)
    elif spec.scheme.startswith("palettize"):
        linear = cto.OpPalettizerConfig(
            nbits=int(spec.scheme.removeprefix("palettize")),
            mode="kmeans",
            granularity="per_grouped_channel",
            group_size=PALETTE_GROUP,
            weight_threshold=WEIGHT_THRESHOLD,
        )
    else:
        linear = None
    if tied:
        return linear, linear
    embedding = None if spec.embedding == "none" else linear_quant(spec.embedding)
    return linear, embedding


@register
class CoreMLBackend(Backend):
    """Core ML ML program with the KV cache as state (iOS 18+)."""

    name = "coreml"
    targets = ("ios",)
    schemes = ("fp16", "int4", "int8", "palettize4", "palettize6")
    artifact_file = "model.mlpackage"
    artifact_format = "coreml-mlpackage"
    default_quant = QuantSettings(scheme="int4", group_size=32, embedding="none")
    order = 2
    target_rank = {"ios": 1}
    quant_algos = ALGORITHMS  # hqq, and --keep-8bit, through integers chosen in torch
    rotates = True
    torch_grid = True
    per_layer_bits = True
    attention = "portable"
    quantizes_in_torch = False
    weight_dtype = torch.float16
    cache_dtype = torch.float16
    keeps_model = True
    option_names = COREML_OPTIONS

    def check_options(self, options: BackendOptions, spec) -> BackendOptions:
        """Deployment target new enough for state and the scheme; known compute units."""
        from mobile_export.recipes import COMPUTE_UNITS

        super().check_options(options, spec)

        target = options.deployment_target or DEFAULT_MIN_IOS
        major = ios_major(target)
        needs = [("KV cache as Core ML state", FEATURE_MIN_IOS["KV cache as Core ML state"])]
        feature = SCHEME_FEATURE.get(spec.scheme)
        if feature:
            needs.append((feature, FEATURE_MIN_IOS[feature]))
        for feature, minimum in needs:
            if major < minimum:
                raise UserError(
                    f"iOS {target} is too old: {feature} needs iOS {minimum} or later",
                    hint=f"use --min-ios {minimum} (or newer)",
                )
        if major not in (18, 26):
            raise UserError(f"minimum iOS {target} is not one coremltools targets", hint="use --min-ios 18 or 26")
        if options.compile_mlmodelc and (platform.system() != "Darwin" or shutil.which("xcrun") is None):
            raise UserError(
                f"--compile-mlmodelc needs macOS with Xcode's command-line tools (this is {platform.system()})",
                hint="leave it out here; Xcode compiles the .mlpackage when the app is built",
            )
        units = options.compute_units or DEFAULT_COMPUTE_UNITS
        if units not in COMPUTE_UNITS:
            raise UserError(f"unknown compute units '{units}'", hint="choose one of: " + ", ".join(COMPUTE_UNITS))
        if spec.embedding not in ("none", "int8", "int4"):
            raise UserError(f"Core ML cannot quantize embeddings as '{spec.embedding}'", hint="use none, int8 or int4")
        return BackendOptions(
            compute_units=units, deployment_target=str(major), compile_mlmodelc=bool(options.compile_mlmodelc)
        )

    def tensor_specs(self, decoder, vocab_size: int) -> tuple[list, list, list]:
        """Core ML names: ``input_ids``, ``causal_mask``, ``logits``; states named like the torch buffers."""
        from mobile_export.bundle import TensorSpec

        inputs = [
            TensorSpec(name="input_ids", dtype="int32", shape=[1, "seq_len"]),
            TensorSpec(name="causal_mask", dtype="float16", shape=[1, 1, "seq_len", "end_pos"]),
        ]
        outputs = [TensorSpec(name="logits", dtype="float16", shape=[1, vocab_size])]
        states = []
        for index, layer in enumerate(decoder.layers):
            for kind in ("k_cache", "v_cache"):
                shape = list(getattr(layer.self_attn, kind).shape)
                states.append(TensorSpec(name=state_name(index, kind), dtype="float16", shape=shape))
        return inputs, outputs, states

    def export(self, model, info: ExportInfo, out_dir: Path, ui) -> ExportedArtifact:
        """Trace, convert to an fp16 ML program with states, compress, add metadata, save."""
        ct = import_coremltools()
        import numpy as np

        from mobile_export.modeling import CoreMLEntry, additive_causal_mask

        entry = CoreMLEntry(model).eval()
        seq = min(8, info.max_seq_len - 1)
        example = (torch.zeros((1, seq), dtype=torch.int32), additive_causal_mask(0, seq, seq, torch.float16))
        ui.update("tracing (TorchScript)")
        with torch.no_grad(), quiet_coremltools():
            traced = torch.jit.trace(entry, example, check_trace=False)
        model.reset_cache()
        size = info.max_seq_len
        q_len = ct.RangeDim(1, size, default=1)
        end = ct.RangeDim(1, size, default=1)
        states = []
        for index, layer in enumerate(model.layers):
            for kind in ("k_cache", "v_cache"):
                shape = tuple(getattr(layer.self_attn, kind).shape)
                buffer = f"decoder.layers.{index}.self_attn.{kind}"
                states.append(ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=buffer))
        ui.update("converting to an ML program")
        target = ct.target.iOS26 if info.options.deployment_target == "26" else ct.target.iOS18
        with quiet_coremltools():
            mlmodel = ct.convert(
                traced,
                inputs=[
                    ct.TensorType("input_ids", shape=(1, q_len), dtype=np.int32),
                    ct.TensorType("causal_mask", shape=(1, 1, q_len, end), dtype=np.float16),
                ],
                outputs=[ct.TensorType("logits", dtype=np.float16)],
                states=states,
                minimum_deployment_target=target,
                compute_precision=ct.precision.FLOAT16,
                compute_units=ct.ComputeUnit[info.options.compute_units.upper()],
                skip_model_load=True,
            )
        del traced
        release_memory()
        tied = tied_embedding(model)
        linear_cfg, embedding_cfg = compression_config(info.spec, ct, tied)
        if linear_cfg is not None or embedding_cfg is not None:
            ui.update(f"compressing weights ({info.spec.label})")
            cto = ct.optimize.coreml
            with quiet_coremltools():
                if info.spec.scheme.startswith("palettize"):
                    ops = {"linear": linear_cfg, "gather": linear_cfg if tied else None}
                    mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_type_configs=ops))
                    if embedding_cfg is not None and not tied:
                        emb_only = cto.OptimizationConfig(op_type_configs={"gather": embedding_cfg})
                        mlmodel = cto.linear_quantize_weights(mlmodel, emb_only)
                else:
                    config = cto.OptimizationConfig(op_type_configs={"linear": linear_cfg, "gather": embedding_cfg})
                    mlmodel = cto.linear_quantize_weights(mlmodel, config)
        metadata = self._metadata(info)
        mlmodel.author = "mobile-export"
        mlmodel.license = info.license
        mlmodel.short_description = f"{info.model_name} ({info.spec.label}), stateful KV cache, mobile-export"
        mlmodel.user_defined_metadata.update(metadata)
        ui.update("saving the package")
        path = out_dir / self.artifact_file
        with quiet_coremltools():
            mlmodel.save(str(path))
        del mlmodel
        release_memory()
        compiled = None
        if info.options.compile_mlmodelc:
            ui.update("xcrun coremlcompiler compile")
            compiled = compile_mlmodelc(path, out_dir).name
        embedding = embedding_storage(info.spec, tied)
        facts = {
            "compiled": compiled,
            "quantization": {"embedding": embedding_entry(embedding, tied)},
            "file": self.artifact_file,
            "format": self.artifact_format,
            "compute_units": info.options.compute_units,
            "minimum_deployment_target": f"iOS{info.options.deployment_target}",
            "compute_precision": "float16",
            "flexible_shapes": f"range: input_ids[1, 1..{size}], causal_mask[1, 1, 1..{size}, 1..{size}]",
            "calling_convention": (
                "tokens at positions end-T..end-1; causal_mask additive fp16 (0 = attend, -inf = masked); "
                "one MLState from makeState() per conversation"
            ),
            "metadata": metadata,
            "min_os": {"ios": info.options.deployment_target},
        }
        return ExportedArtifact.from_facts(facts)

    @staticmethod
    def _metadata(info: ExportInfo) -> dict[str, str]:
        """The package's user-defined metadata (strings only, as Core ML requires)."""
        values = {
            "mobile_export.recipe": info.model_name,
            "mobile_export.source_model": info.hf_id or "",
            "mobile_export.revision": info.revision or "",
            "mobile_export.license": info.license,
            "mobile_export.quantization": info.spec.label,
            "mobile_export.context_length": str(info.max_seq_len),
            "mobile_export.vocab_size": str(info.vocab_size),
            "mobile_export.bos_id": "" if info.bos_id is None else str(info.bos_id),
            "mobile_export.eos_ids": ",".join(str(i) for i in info.eos_ids),
        }
        return values

    def verify(self, artifact: ExportedArtifact, folder: Path, ctx: VerifyContext, decoder) -> Verification:
        """Read the package back and check it; run its weights in PyTorch; predict on macOS.

        1. I/O and states of the saved spec equal the manifest's (names, dtypes, shapes, ranges).
        2. Every linear (and embedding) weight is stored as the scheme asks, read from the MIL
           program: op type, element dtype, block size or lookup-table size.
        3. The exact module that was traced, in fp32 compute with its fp16 weights, against the
           original model.
        4. For compressed packages: the package's own weights, dequantized and loaded into that
           module, against the original (the quantization cost) .
        5. macOS only: ``MLModel.predict`` with state over prefill and decode.
        """
        result = Verification()
        ui = ctx.ui
        ui.update("reading the package back")
        package_dir = artifact.path(folder)
        package = read_package(package_dir)
        expected = self.tensor_specs(decoder, int(decoder.lm_head.out_features))
        result.failures += check_io(package, *expected)
        summary, problems = check_compression(package, ctx.spec, tied_embedding(decoder))
        result.failures += problems
        weights = package_dir / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        result.details["coreml_package"] = {
            "io_matches_manifest": not result.failures,
            "compression": summary,
            "weight_file_bytes": weights.stat().st_size if weights.is_file() else None,
        }
        result.notes.append(
            "Core ML weights: "
            + ", ".join(f"{count} {kind}" for kind, count in summary["linear_weights"].items())
            + (f"; embedding {summary['embedding']}" if summary.get("embedding") else "")
        )

        ui.update("eager run of the converted module (fp32 compute)")
        # weights quantized before conversion (--quant-algo gptq/awq) carry coremltools' compression info
        prequantized = any("_COREML_/" in name for name, _ in decoder.named_buffers())
        decoder.float()
        decoder.reset_cache()
        got = stepped_logits(decoder.step, ctx.sequences)
        if prequantized:
            result.comparisons += standard_comparisons(got, ctx, "converted module, quantized before conversion,")
        else:
            result.comparisons.append(
                compare("converted module (fp16 weights) vs original", got, ctx.reference, FP16_WEIGHT_THRESHOLDS)
            )
        package_logits = None
        if ctx.spec.is_quantized:
            ui.update("eager run with the package's weights")
            loaded = load_package_weights(package, decoder)
            result.details["coreml_package"]["weights_loaded_into_pytorch"] = loaded
            decoder.reset_cache()
            package_logits = stepped_logits(decoder.step, ctx.sequences)
            result.comparisons += standard_comparisons(package_logits, ctx, "package weights in PyTorch")
            if prequantized:  # the package must hold exactly the integers and scales chosen in PyTorch
                result.comparisons.append(
                    compare("package weights vs converted module", package_logits, got, FP16_WEIGHT_THRESHOLDS)
                )
        del package
        release_memory()
        if platform.system() == "Darwin":
            ui.update("MLModel.predict with state")
            runtime = CoreMLRuntime(package_dir)
            on_device = stepped_logits(runtime.step, ctx.sequences)
            result.comparisons += standard_comparisons(on_device, ctx, "Core ML predict")
            result.details["coreml_predict"] = "ran on macOS"
        else:
            if package_logits is not None:
                decoder.reset_cache()
                result.stand_in, result.stand_in_label = decoder, "the package's weights in PyTorch (fp32 compute)"
            reason = f"skipped: MLModel.predict needs macOS 15+ (this is {platform.system()})"
            result.details["coreml_predict"] = reason
            result.notes.append(f"Core ML predict: {reason}; the checks above ran on the package's spec and weights")
        return result


def compile_mlmodelc(package: Path, out_dir: Path) -> Path:
    """``xcrun coremlcompiler compile`` the package next to it (macOS with Xcode only)."""
    done = subprocess.run(
        ["xcrun", "coremlcompiler", "compile", str(package), str(out_dir)], capture_output=True, text=True
    )
    compiled = out_dir / (package.stem + ".mlmodelc")
    if done.returncode != 0 or not compiled.is_dir():
        raise UserError(f"xcrun coremlcompiler failed: {(done.stderr or done.stdout).strip()[:200]}")
    return compiled
