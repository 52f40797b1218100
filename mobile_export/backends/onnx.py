"""ONNX Runtime (GenAI): ``torch.onnx.export`` → ONNX Runtime fusions → ``MatMulNBits`` → a GenAI folder.

The bundle is a folder ONNX Runtime GenAI's ``og.Model(folder)`` loads unchanged on Android,
iOS and the host: ``model.onnx`` + ``model.onnx.data``, ``genai_config.json`` and the tokenizer.
See :mod:`mobile_export.backends.onnx_graph` for export and fusions,
:mod:`mobile_export.backends.onnx_quant` for quantization and :mod:`mobile_export.ort_attention`
for the attention op.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from mobile_export.backends import (
    Backend,
    BackendOptions,
    ExportedArtifact,
    ExportInfo,
    Verification,
    VerifyContext,
    onnx_graph,
    onnx_quant,
    register,
)
from mobile_export.backends.genai_config import genai_config, genai_type
from mobile_export.errors import UserError
from mobile_export.memory import drop_weights, release_memory
from mobile_export.quantize import keep_8bit_matcher, projection_parts
from mobile_export.recipes import QuantSettings
from mobile_export.runtimes.onnx import OnnxRuntime, genai_generate
from mobile_export.verify import FIXED_PROMPTS, FP32_THRESHOLDS, compare, standard_comparisons, stepped_logits

GENAI_CHECK_TOKENS = 8
POWER_OF_TWO_BLOCKS: tuple[int, ...] = (16, 32, 64, 128, 256)  # MatMulNBits/GatherBlockQuantized block sizes


def split_mixed_projections(model, spec) -> list[int]:
    """Un-fuse the q/k/v matmul of every layer whose q, k and v take different bits or blocks
    (``--keep-8bit``, ``--group-size-for``): ``GroupQueryAttention`` then reads three inputs.
    Returns the indices of the layers split."""
    n_layers = len(model.layers)
    split = []
    for index, layer in enumerate(model.layers):
        attn = layer.self_attn
        if getattr(attn, "qkv_proj", None) is None:
            continue
        names = projection_parts(f"layers.{index}.self_attn.qkv_proj")
        if len({onnx_quant.layer_quant(spec, name, n_layers) for name in names}) > 1:
            attn.split_qkv()
            split.append(index)
    return split


@register
class OnnxBackend(Backend):
    """ONNX Runtime with its fused contrib ops; one folder for Android and iOS."""

    name = "onnx"
    targets = ("android", "ios")
    schemes = ("fp32", "fp16", "int4", "int8")
    artifact_file = "model.onnx"
    artifact_format = "onnxruntime-genai"
    default_quant = QuantSettings(scheme="int4", group_size=32, embedding="int4")
    order = 4
    target_rank = {"android": 2, "ios": 4}
    quant_algos = ("rtn", "hqq")  # ONNX Runtime's MatMulNBitsQuantizer (default RTN, HQQ)
    algo_hint = "ONNX Runtime's quantizer offers rtn and hqq here; use --quant-algo rtn or hqq"
    per_layer_bits = True
    group_patterns = True
    own_embedding_groups = True
    attention = "onnx"
    quantizes_in_torch = False
    weight_dtype = torch.float32
    cache_dtype = torch.float32
    weight_only = True
    option_names = ("opset", "min_onnxruntime")

    def check_options(self, options: BackendOptions, spec) -> BackendOptions:
        """Opset (18 or newer) and the oldest ONNX Runtime the folder must load in."""
        super().check_options(options, spec)
        if options.opset is None:
            options = dataclasses.replace(options, opset=onnx_graph.DEFAULT_OPSET)
        if options.opset < onnx_graph.DEFAULT_OPSET:
            raise UserError(
                f"opset {options.opset} is too old for the ONNX export",
                hint=f"torch.onnx's exporter writes opset {onnx_graph.DEFAULT_OPSET} or newer",
            )
        if spec.embedding == "int8":
            raise UserError(
                "backend 'onnx' cannot store embeddings as int8: ONNX Runtime's quantizer writes 4-bit "
                "GatherBlockQuantized tables only",
                hint="use --embedding-quant int4 or none",
            )
        if options.min_onnxruntime is not None:
            onnx_graph.check_min_onnxruntime(options.min_onnxruntime, self.expected_ops(spec))
        if spec.keep_8bit and keep_8bit_matcher(spec.keep_8bit, 1)("embed_tokens"):
            raise UserError(
                "backend 'onnx' cannot keep embed_tokens at 8 bits: ONNX Runtime's quantizer writes 4-bit "
                "embedding tables only",
                hint="leave embed_tokens out of --keep-8bit (a tied embedding shares the LM head's table)",
            )
        if spec.embedding_group_size is not None and spec.embedding_group_size not in POWER_OF_TWO_BLOCKS:
            raise UserError(
                f"backend 'onnx' cannot use --embedding-group-size {spec.embedding_group_size}",
                hint="ONNX Runtime's blocks are powers of two: " + ", ".join(map(str, POWER_OF_TWO_BLOCKS)),
            )
        return options

    def expected_ops(self, spec) -> list[str]:
        """Contrib ops every build with ``spec`` emits (versions checked before any work)."""
        ops = ["GroupQueryAttention"]
        if spec.scheme in ("int4", "int8"):
            ops.append("MatMulNBits")
        if spec.embedding == "int4":
            ops.append("GatherBlockQuantized")
        return ops

    def tensor_specs(self, decoder, vocab_size: int) -> tuple[list, list, list]:
        """ONNX Runtime GenAI's inputs and outputs; the KV cache is past/present tensors."""
        from mobile_export.bundle import TensorSpec

        attn = decoder.layers[0].self_attn
        kv = [1, attn.n_kv_heads, "past_sequence_length", attn.head_dim]
        present = [1, attn.n_kv_heads, "total_sequence_length", attn.head_dim]
        past_names, present_names = onnx_graph.kv_names(len(decoder.layers))
        inputs = [
            TensorSpec(name="input_ids", dtype="int64", shape=[1, "sequence_length"]),
            TensorSpec(name="attention_mask", dtype="int64", shape=[1, "total_sequence_length"]),
            *(TensorSpec(name=n, dtype="float32", shape=kv) for n in past_names),
        ]
        outputs = [
            TensorSpec(name="logits", dtype="float32", shape=[1, "sequence_length", vocab_size]),
            *(TensorSpec(name=n, dtype="float32", shape=present) for n in present_names),
        ]
        return inputs, outputs, []

    def export(self, model, info: ExportInfo, out_dir: Path, ui) -> ExportedArtifact:
        """Export, fuse, quantize and write the GenAI folder's model and config."""
        import onnx
        import onnx_ir
        import onnxruntime

        spec, options = info.spec, info.options
        genai_type(model.config.model_type)  # a family GenAI cannot name is refused before any work
        report = onnx_graph.GraphReport(opset=options.opset)
        split = split_mixed_projections(model, spec)
        tied = onnx_quant.untie_for_export(model)
        softcap = any(layer.self_attn.softcap for layer in model.layers)
        attn = model.layers[0].self_attn
        rotary_in_op = attn.rotary_in_op
        graph = onnx_graph.export_graph(model, options.opset, ui)
        ui.update("ONNX Runtime fusions (onnxscript)")
        report.fusions = onnx_graph.fuse(graph)
        config = genai_config(
            model.config.model_type,
            n_layers=len(model.layers),
            n_heads=attn.n_heads,
            n_kv_heads=attn.n_kv_heads,
            head_dim=attn.head_dim,
            hidden_size=int(model.config.hidden_size),
            vocab_size=info.vocab_size,
            context_length=info.max_seq_len,
            bos_id=info.bos_id,
            eos_ids=info.eos_ids,
            pad_id=getattr(model.config, "pad_token_id", None),
        )
        n_layers = len(model.layers)
        # The fp32 graph goes to a scratch folder first, streamed from the PyTorch weights; the
        # weights are then released and the graph read back for quantization (one fp32 copy in
        # memory at a time). verify() runs this fp32 graph too: it proves export and fusions exact.
        ui.update("writing the fp32 graph")
        scratch = tempfile.TemporaryDirectory(prefix="mobile-export-onnx-")
        fp32_dir = Path(scratch.name)
        onnx_ir.save(graph, fp32_dir / self.artifact_file, external_data=onnx_graph.EXTERNAL_DATA)
        (fp32_dir / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        del graph
        drop_weights(model)  # the graph on disk holds them now
        release_memory()
        ui.update("loading the fp32 graph")
        proto = onnx.load(str(fp32_dir / self.artifact_file))
        fp32_graph = scratch if spec.is_quantized else None
        ui.update(f"quantizing ({spec.label}) with ONNX Runtime's MatMulNBitsQuantizer")
        proto = onnx_quant.quantize(proto, spec, report, tied, n_layers)
        report.op_counts = onnx_graph.op_counts(proto.graph)
        needed = onnx_graph.ops_needing_versions(report.op_counts, softcap)
        if options.min_onnxruntime is not None:
            onnx_graph.check_min_onnxruntime(options.min_onnxruntime, needed)
        ui.update("writing model.onnx")
        _write_folder(proto, config, out_dir)
        del proto
        if fp32_graph is None:
            scratch.cleanup()
        release_memory()
        fused = {
            op: n for op, n in report.op_counts.items() if op.startswith("com.microsoft.") or "Normalization" in op
        }
        missing = _missing_fusions(report.op_counts, n_layers, rotary_in_op)
        facts = {
            "file": self.artifact_file,
            "files": [self.artifact_file, onnx_graph.EXTERNAL_DATA, "genai_config.json"],
            "format": self.artifact_format,
            "opset": options.opset,
            "onnxruntime": onnxruntime.__version__,
            "min_onnxruntime": onnx_graph.min_onnxruntime(needed),
            "fusions": report.fusions,
            "fused_ops": fused,
            "fusions_missing": missing,
            "rotary_in_attention": rotary_in_op,
            "tied_embedding_shared": report.tied_embedding_shared,
            "quantization": {
                "quantizer": "onnxruntime MatMulNBitsQuantizer",
                "accuracy_level": onnx_quant.ACCURACY_LEVEL,
                "nodes": report.node_plan,
                **({"qkv_split_layers": split} if split else {}),
            }
            if spec.scheme in ("int4", "int8") or spec.embedding != "none"
            else {},
        }
        # verify() checks the fp32 graph before quantization exactly, then removes it
        return ExportedArtifact.from_facts(facts, **({"fp32_graph": fp32_graph} if fp32_graph is not None else {}))

    def verify(self, artifact: ExportedArtifact, folder: Path, ctx: VerifyContext, decoder) -> Verification:
        """Step the model in ONNX Runtime; check the fp32 graph exactly; generate with ONNX Runtime GenAI."""
        result = Verification()
        scratch = artifact.verify_inputs.pop("fp32_graph", None)
        model_file = artifact.path(folder)
        if scratch is not None:
            ctx.ui.update("fp32 graph before quantization")
            runtime = OnnxRuntime(Path(scratch.name) / "model.onnx")
            got = stepped_logits(runtime.step, ctx.sequences)
            del runtime
            scratch.cleanup()
            result.comparisons.append(compare("graph parity (fp32 ONNX before quantization vs original)", got,
                                              ctx.reference, _fp32_thresholds(ctx)))  # fmt: skip
        ctx.ui.update("ONNX Runtime session")
        runtime = OnnxRuntime(model_file)
        got = stepped_logits(runtime.step, ctx.sequences)
        result.comparisons += standard_comparisons(got, ctx)
        prompt = list(ctx.tokenizer(FIXED_PROMPTS[0])["input_ids"])
        from mobile_export.generate import generate

        host = generate(runtime.step, prompt, GENAI_CHECK_TOKENS, set(ctx.eos_ids), runtime.max_seq_len).tokens
        del runtime
        release_memory()
        ctx.ui.update("ONNX Runtime GenAI")
        tokens, timings = genai_generate(folder, prompt, len(host))
        status = (
            f"ok, same {len(host)} greedy tokens"
            if tokens == host
            else f"FAILED: GenAI generated {tokens[:8]}, the ONNX Runtime session {host[:8]}"
        )
        result.details["onnxruntime_genai"] = {"prompt": FIXED_PROMPTS[0], "tokens": tokens, "status": status,
                                               **{k: round(v, 4) for k, v in timings.items()}}  # fmt: skip
        result.notes.append(f"ONNX Runtime GenAI: {status}")
        if status.startswith("FAILED"):
            result.failures.append(f"ONNX Runtime GenAI disagrees with the session: {status}")
        return result


def _fp32_thresholds(ctx: VerifyContext):
    from mobile_export.verify import BF16_REFERENCE_THRESHOLDS

    return FP32_THRESHOLDS if ctx.reference_dtype == torch.float32 else BF16_REFERENCE_THRESHOLDS


def _missing_fusions(counts: dict[str, int], n_layers: int, rotary_in_op: bool) -> list[str]:
    """Fusions that did not apply to every layer (the graph still runs, more slowly)."""
    missing = []
    if counts.get("com.microsoft.SkipSimplifiedLayerNormalization", 0) < n_layers:
        missing.append("SkipSimplifiedLayerNormalization (residual add + RMSNorm)")
    if (
        counts.get("SimplifiedLayerNormalization", 0) + counts.get("com.microsoft.SkipSimplifiedLayerNormalization", 0)
        == 0
    ):
        missing.append("SimplifiedLayerNormalization (RMSNorm)")
    if not rotary_in_op:
        missing.append("rotary embedding inside GroupQueryAttention (rotary width not a multiple of 16)")
    return missing



def _write_folder(proto, config: dict, folder: Path) -> None:
    """``model.onnx`` + external data and ``genai_config.json`` into ``folder``."""
    onnx_graph.save(proto, folder)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
