"""ExecuTorch with its Core ML delegate (iOS): ``torch.export`` → ``CoreMLPartitioner`` → ``model.pte``.

For teams that run ExecuTorch on both platforms. The decoder uses portable attention (plain
slice updates and SDPA), which Core ML takes whole: one delegate holds every layer; the KV cache
stays an ExecuTorch mutable buffer (``take_over_mutable_buffer=False``, because ExecuTorch's
open-source Core ML runtime does not bind Core ML states). Weights: ``fp32`` (run in fp16 by
Core ML), or torchao weight-only ``int4`` (per block) / ``int8`` (per channel), which the Core ML
delegate stores compressed.

Linux has no Core ML runtime, so the .pte cannot run here: verification checks the lowered
program (everything delegated, metadata methods, compressed weights in the delegated graph)
and runs the exact exported program eagerly against the original model.
"""

from __future__ import annotations

import gc
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
from mobile_export.backends.coreml import DEFAULT_COMPUTE_UNITS, CoreMLBackend
from mobile_export.backends.xnnpack import runner_metadata
from mobile_export.errors import UserError
from mobile_export.memory import release_memory
from mobile_export.quantize import ALGORITHMS
from mobile_export.recipes import QuantSettings
from mobile_export.runtimes.coreml import import_coremltools, quiet_coremltools
from mobile_export.verify import standard_comparisons, stepped_logits

DEQUANTIZE_OPS = ("dequantize_affine", "dequantize_per_channel_group", "dequantize_per_channel")


@register
class CoreMLExecuTorchBackend(Backend):
    """ExecuTorch program delegated to Core ML (iOS 18+)."""

    name = "coreml-executorch"
    targets = ("ios",)
    schemes = ("fp32", "int4", "int8")
    artifact_file = "model.pte"
    artifact_format = "executorch-pte"
    delegate = "CoreMLBackend"
    default_quant = QuantSettings(scheme="int4", group_size=32, embedding="none")
    order = 3
    target_rank = {"ios": 2}
    quant_algos = ALGORITHMS
    rotates = True
    attention = "portable"
    keeps_model = True
    option_names = COREML_OPTIONS
    weight_only = True

    def check_options(self, options: BackendOptions, spec) -> BackendOptions:
        if spec.embedding != "none":
            raise UserError(
                f"backend '{self.name}' keeps embeddings unquantized, not '{spec.embedding}'",
                hint="use --embedding-quant none",
            )
        return CoreMLBackend().check_options(options, spec)

    def export(self, model, info: ExportInfo, out_dir: Path, ui) -> ExportedArtifact:
        """Export with a dynamic token count, lower to Core ML, write ``model.pte``."""
        ct = import_coremltools()
        from executorch.backends.apple.coreml.compiler import CoreMLBackend as EtCoreML
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
        from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

        from mobile_export.modeling import example_inputs

        # The quantized spec is weight-only here (Core ML dequantizes on the fly).
        metadata = runner_metadata(info, sdpa_with_kv_cache=False)
        for param in model.parameters():
            param.requires_grad_(False)
        max_seq_len = model.max_seq_len
        # max_seq_len - 1: a prefill can never fill the whole cache anyway (a token must follow),
        # and the full length trips a shape guard in the slice update.
        seq = torch.export.Dim("seq_len", min=1, max=max_seq_len - 1)
        ui.update("torch.export")
        with torch.no_grad():
            program = torch.export.export(
                model, example_inputs(max_seq_len), dynamic_shapes=({1: seq}, None), strict=False
            )
        units = (info.options.compute_units or DEFAULT_COMPUTE_UNITS).upper()
        specs = EtCoreML.generate_compile_specs(
            minimum_deployment_target=ct.target.iOS26 if info.options.deployment_target == "26" else ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            compute_unit=ct.ComputeUnit[units],
        )
        ui.update("lowering to Core ML")
        with torch.no_grad(), quiet_coremltools():
            edge = to_edge_transform_and_lower(
                program,
                partitioner=[CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=False)],
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
                constant_methods=metadata,
            )
        graph = edge.exported_program().graph
        delegates = [n for n in graph.nodes if n.op == "call_function" and "executorch_call_delegate" in str(n.target)]
        outside = sorted(
            {
                str(n.target)
                for n in graph.nodes
                if n.op == "call_function" and n not in delegates and "getitem" not in str(n.target)
            }
        )
        lowered_facts = {"delegates": len(delegates), "ops_outside_core_ml": outside}
        compressed = _compressed_linears(edge)
        ui.update("serializing")
        with quiet_coremltools():
            executorch_program = edge.to_executorch()
        del edge
        gc.collect()
        path = out_dir / self.artifact_file
        with path.open("wb") as handle:
            executorch_program.write_to_file(handle)
        del executorch_program
        release_memory()
        facts = {
            "file": self.artifact_file,
            "format": self.artifact_format,
            "delegate": self.delegate,
            "compute_units": units.lower(),
            "minimum_deployment_target": f"iOS{info.options.deployment_target}",
            "methods": ["forward", *sorted(metadata)],
            "metadata": metadata,
            "core_ml_partitions": len(delegates),
            "min_os": {"ios": info.options.deployment_target},
        }
        # verify() runs the exact program lowered eagerly, and checks the lowering's facts
        return ExportedArtifact.from_facts(
            facts, exported=program, lowered_facts=lowered_facts, compressed_linears=compressed
        )

    def verify(self, artifact: ExportedArtifact, folder: Path, ctx: VerifyContext, decoder) -> Verification:
        """Program structure, compressed weights, and the exported program run eagerly."""
        result = Verification()
        facts = dict(artifact.verify_inputs["lowered_facts"])
        compressed = artifact.verify_inputs["compressed_linears"]
        if facts["delegates"] < 1:
            result.failures.append("nothing was delegated to Core ML")
        if facts["ops_outside_core_ml"]:
            result.notes.append("ops left to ExecuTorch's CPU kernels: " + ", ".join(facts["ops_outside_core_ml"]))
        facts["compressed_linears"] = compressed
        if ctx.spec.is_quantized and compressed == 0:
            result.failures.append(f"no linear weight in the delegated program is quantized ({ctx.spec.label} asked)")
        result.details["coreml_executorch"] = facts
        ctx.ui.update("eager run of the exported program")
        module = artifact.verify_inputs["exported"].module()
        _reset_buffers(module)

        def step(tokens: list[int], start_pos: int) -> torch.Tensor:
            with torch.no_grad():
                out = module(torch.tensor([tokens], dtype=torch.long), torch.tensor([start_pos], dtype=torch.long))
            return out[0].float()

        got = stepped_logits(step, ctx.sequences)
        result.comparisons += standard_comparisons(got, ctx, "exported program, eager,")
        result.notes.append(
            f"Core ML delegate: {facts['delegates']} partition(s), {compressed} quantized linears; "
            "the .pte itself needs iOS/macOS to run (skipped here)"
        )
        result.details["coreml_predict"] = "skipped: ExecuTorch's Core ML delegate runs only on iOS/macOS"
        artifact.release()
        release_memory()
        return result


def _reset_buffers(module: torch.nn.Module) -> None:
    for name, buf in module.named_buffers():
        if name.endswith(("k_cache", "v_cache")):
            buf.zero_()


def _compressed_linears(edge) -> int:
    """Linear ops inside the Core ML delegates whose weight comes out of a dequantize op."""
    count = 0
    program = edge.exported_program()
    for node in program.graph.nodes:
        if node.op != "get_attr" or not node.name.startswith("lowered_module"):
            continue
        lowered = getattr(program.graph_module, node.target)
        for inner in lowered.original_module.graph.nodes:
            if inner.op == "call_function" and any(k in str(inner.target) for k in ("linear", "mm")):
                weight = inner.args[1] if len(inner.args) > 1 else None
                if (
                    weight is not None
                    and hasattr(weight, "target")
                    and any(d in str(weight.target) for d in DEQUANTIZE_OPS)
                ):
                    count += 1
    return count
