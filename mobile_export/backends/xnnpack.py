"""ExecuTorch + XNNPACK: ``torch.export`` → ``to_edge`` + ``to_backend`` → ``model.pte``.

The program has one ``forward(tokens, input_pos)`` method plus the constant metadata methods
ExecuTorch's LLM runner reads (``get_max_seq_len``, ``get_bos_id``, ``get_eos_ids``,
``use_kv_cache``, ``use_sdpa_with_kv_cache``, ``enable_dynamic_shape``...), so its own Android
and iOS runners load the file unchanged.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path

import torch

from mobile_export.backends import Backend, ExportedArtifact, ExportInfo, Verification, VerifyContext, register
from mobile_export.backends.edge_passes import gated_edge_passes
from mobile_export.backends.parallel_preprocess import parallel_preprocess
from mobile_export.console import quiet_loggers
from mobile_export.memory import drop_weights, release_memory
from mobile_export.modeling import dynamic_shapes, example_inputs
from mobile_export.quantize import ALGORITHMS
from mobile_export.recipes import QuantSettings
from mobile_export.runtimes.executorch import ExecuTorchRuntime
from mobile_export.verify import FIXED_PROMPTS, standard_comparisons, stepped_logits


def runner_metadata(info: ExportInfo, *, sdpa_with_kv_cache: bool = True) -> dict:
    """Constant methods ExecuTorch's LLM runner reads from a .pte."""
    metadata = {
        "get_max_seq_len": info.max_seq_len,
        "get_max_context_len": info.max_seq_len,
        "get_vocab_size": info.vocab_size,
        "get_n_layers": info.n_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": sdpa_with_kv_cache,
        "enable_dynamic_shape": True,
    }
    if info.bos_id is not None:
        metadata["get_bos_id"] = info.bos_id
    if info.eos_ids:
        metadata["get_eos_ids"] = list(info.eos_ids)
    return metadata


RUNNER_CHECK_TOKENS = 8


def host_greedy_tokens(runtime, tokenizer, eos: list[int]) -> list[int]:
    """Greedy tokens our host stepping generates for the runner check's prompt."""
    from mobile_export.generate import generate

    ids = list(tokenizer(FIXED_PROMPTS[0])["input_ids"])
    return generate(runtime.step, ids, RUNNER_CHECK_TOKENS, set(eos), runtime.max_seq_len).tokens


def check_runner(pte: Path, tokenizer_file: Path, tokenizer, eos: list[int], host_tokens: list[int]) -> dict:
    """Generate with ExecuTorch's C++ LLM runner; its text must equal our host run's.

    Proves the .pte's metadata methods and I/O follow the runner's conventions, so the
    runners in ExecuTorch's Android/iOS libraries load it unchanged.
    """
    from mobile_export.runtimes.executorch import runner_generate

    prompt = FIXED_PROMPTS[0]
    new_tokens = RUNNER_CHECK_TOKENS
    ids = list(tokenizer(prompt)["input_ids"])
    num_bos = 1 if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id] else 0
    our_text = tokenizer.decode([t for t in host_tokens if t not in eos], skip_special_tokens=True)
    runner_text, stats = runner_generate(pte, tokenizer_file, prompt, new_tokens, num_bos)
    result = {"prompt": prompt, "new_tokens": new_tokens, "num_bos": num_bos, "stats": stats}
    if runner_text is None:
        result["status"] = "loaded and generated; text not compared (runner passed a partial UTF-8 piece)"
    elif runner_text == our_text:
        result["status"] = f"ok, same {len(host_tokens)} greedy tokens"
    else:
        result["status"] = f"FAILED: runner wrote {runner_text[:40]!r}, host run {our_text[:40]!r}"
    return result


# XNNPACK passes that only rewrite ops a decoder LLM graph never contains (convolutions, batch
# norm, pooling, upsampling, PReLU, static-quant padding) or fuse a pattern this tool never
# emits (XNNPACK's own SDPA: attention runs in ExecuTorch's custom SDPA op).
SKIPPED_XNNPACK_PASSES = frozenset(
    {
        "ConvertToUpsampleBilinear2d",
        "ConvertToSDPAPass",
        "FuseBatchNormPass",
        "DecomposeBatchNorm",
        "Conv1dUnsqueezePass",
        "PReLUReshapePass",
        "InsertPadQDQPass",
    }
)

# Passes that rewrite only the ops named here (read off each pass's source, ExecuTorch 1.5): run
# on a partition only when it holds one of them. A pass that changes nothing still re-traces the
# whole partition with fake tensors; XNNPACK runs its list on each of a decoder's layers.
OP_GATED_XNNPACK_PASSES = {
    "XNNPACKRemoveCloneOpsTransform": ("aten.clone.default", "dim_order_ops._clone_dim_order.default"),
    "DimOrderOpsRevertPass": ("dim_order_ops.",),
    "ConvertToLinearPass": ("aten.mm.default", "aten.addmm.default", "aten.bmm.default"),
    "FuseActivationPass": ("aten.relu.default", "aten.hardtanh.default"),
    "DecomposeConcatenate": ("aten.cat.default",),
    "RemoveGetItemPass": ("aten.max_pool2d_with_indices.default", "aten.max.dim"),
    "RemoveRedundantCopyPass": ("aten._to_copy.default",),
}


def _graph_ops(program) -> set[str]:
    return {
        getattr(node.target, "__name__", str(node.target)) for node in program.graph.nodes if node.op == "call_function"
    }


def _pass_applies(pass_type: type, ops: set[str]) -> bool:
    gate = OP_GATED_XNNPACK_PASSES.get(pass_type.__name__)
    return gate is None or any(op.startswith(g) if g.endswith(".") else op == g for op in ops for g in gate)


@contextlib.contextmanager
def lean_xnnpack_passes() -> Iterator[None]:
    """While lowering, XNNPACK's default pass list without :data:`SKIPPED_XNNPACK_PASSES`, and
    each pass of :data:`OP_GATED_XNNPACK_PASSES` run only on partitions holding its ops.

    Output is byte-identical (``.pte`` compared on real SmolLM2 layers and tiny models); every
    build also verifies the lowered program against eager PyTorch, so a pass that turned out to
    matter would fail the build rather than ship wrong numbers.
    """
    from executorch.backends.xnnpack import _passes
    from executorch.backends.xnnpack._passes.xnnpack_pass import XNNPACKPass
    from executorch.exir.program._program import _transform

    manager = _passes.XNNPACKPassManager
    original = manager.transform

    def gated_transform(self):
        # XNNPACKPassManager.transform's own loop (instantiate, ``_transform``), plus the gate.
        program = self.exported_program
        for pass_type in self.passes:
            if pass_type.__name__ in SKIPPED_XNNPACK_PASSES or not _pass_applies(pass_type, _graph_ops(program)):
                continue
            instance = pass_type(program) if issubclass(pass_type, XNNPACKPass) else pass_type()
            program = _transform(program, instance)
        return program

    manager.transform = gated_transform
    try:
        yield
    finally:
        manager.transform = original


def partitioner_configs() -> list:
    """XNNPACK's op configs without sine and cosine: the rotary rows the graph computes (see
    ``rope_tables.rope_frequencies``) then run in ExecuTorch's portable kernels, which round like
    PyTorch's, rather than in XNNPACK's polynomial approximations (1e-3 relative error in the
    logits of a tiny model, growing with the angle, that is, with the position)."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS, CosConfig, SinConfig

    return [config for config in ALL_PARTITIONER_CONFIGS if config not in (SinConfig, CosConfig)]


@register
class XnnpackBackend(Backend):
    """ExecuTorch program delegated to XNNPACK (Android and iOS CPUs)."""

    name = "xnnpack"
    targets = ("android", "ios")
    schemes = ("fp32", "8da4w", "int8")
    artifact_file = "model.pte"
    artifact_format = "executorch-pte"
    default_quant = QuantSettings(scheme="8da4w", group_size=32, embedding="int8")
    order = 1
    target_rank = {"android": 1, "ios": 3}
    quant_algos = ALGORITHMS
    rotates = True
    exact_eager_stand_in = True

    def export(self, model, info: ExportInfo, out_dir: Path, ui) -> ExportedArtifact:
        """Export, lower and write ``model.pte``; the model's weights are released on the way."""
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend as XnnpackDetails
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

        metadata = runner_metadata(info)
        max_seq_len = model.max_seq_len
        ui.update("torch.export")
        program = torch.export.export(
            model, example_inputs(max_seq_len), dynamic_shapes=dynamic_shapes(max_seq_len), strict=False
        )
        ui.update("lowering to XNNPACK")
        # ``to_edge`` + ``to_backend`` rather than ``to_edge_transform_and_lower``: the latter
        # runs three whole-graph decompositions (functionalize, preserve, re-decompose; ~37 s
        # each on a real 135M model), the former one, keeping XNNPACK's own ops whole. ExecuTorch
        # 1.5 still supports this workflow but logs it as deprecated (silenced: nothing for a
        # user to do); ``check_lowered`` is the sanity check the newer entry point would make.
        configs = partitioner_configs()
        with gated_edge_passes():
            edge = to_edge(
                program,
                compile_config=EdgeCompileConfig(_check_ir_validity=False, preserve_ops=preserved_ops(configs)),
                constant_methods=metadata,
            )
        with (
            lean_xnnpack_passes(),
            quiet_loggers(XnnpackPartitioner.__module__),
            parallel_preprocess(XnnpackDetails) as workers,
        ):
            if workers > 1:
                ui.update(f"lowering to XNNPACK ({workers} processes)")
            edge = edge.to_backend(XnnpackPartitioner(configs=configs))
        check_lowered(edge.exported_program())
        del program
        drop_weights(model)  # the lowered program holds what it needs; free the eager copy
        release_memory()
        delegates = sum(
            1
            for node in edge.exported_program().graph.nodes
            if node.op == "call_function" and "executorch_call_delegate" in str(node.target)
        )
        ui.update("serializing")
        executorch_program = edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                do_quant_fusion_and_const_prop=True,
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            )
        )
        del edge
        gc.collect()
        path = out_dir / self.artifact_file
        with path.open("wb") as handle:
            executorch_program.write_to_file(handle)
        del executorch_program
        gc.collect()
        return ExportedArtifact.from_facts(
            {
                "file": self.artifact_file,
                "format": self.artifact_format,
                "methods": ["forward", *sorted(metadata)],
                "metadata": metadata,
                "xnnpack_partitions": delegates,
            }
        )

    def verify(self, artifact: ExportedArtifact, folder: Path, ctx: VerifyContext, decoder) -> Verification:
        """Step the .pte in ExecuTorch's host runtime, then generate with its C++ LLM runner."""

        pte = artifact.path(folder)
        runtime = ExecuTorchRuntime(pte)
        got = stepped_logits(runtime.step, ctx.sequences)
        result = Verification(comparisons=standard_comparisons(got, ctx))
        host_tokens = host_greedy_tokens(runtime, ctx.tokenizer, ctx.eos_ids)
        del runtime  # one loaded copy of the program at a time
        release_memory()
        ctx.ui.update("ExecuTorch's LLM runner")
        runner = check_runner(pte, folder / "tokenizer.json", ctx.tokenizer, ctx.eos_ids, host_tokens)
        result.details["llm_runner"] = runner
        result.notes.append(f"ExecuTorch LLM runner: {runner['status']}")
        if runner["status"].startswith("FAILED"):
            result.failures.append(f"ExecuTorch's LLM runner disagrees with the host run: {runner['status']}")
        return result


def preserved_ops(configs: list) -> list:
    """The ATen and torchao ops XNNPACK's configs lower whole (linear, the affine quantize ops):
    kept out of the core-ATen decomposition so the partitioner still sees them."""
    return [op for op in (config().get_original_aten() for config in configs) if op is not None]


def check_lowered(program) -> None:
    """Fail the build if a linear layer stayed outside XNNPACK (it would run unquantized, slowly)."""
    left = sorted(
        {
            str(node.target)
            for node in program.graph.nodes
            if node.op == "call_function" and "linear" in str(node.target)
        }
    )
    if left:
        raise RuntimeError(
            f"XNNPACK left {', '.join(left)} undelegated; the program would run them on portable kernels"
        )
