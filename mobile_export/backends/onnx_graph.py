"""The ONNX graph of a decoder: export, fusions, quantization, saving; each step reports what it did.

- **Export**: ``torch.onnx.export(..., dynamo=True)`` of :class:`~mobile_export.modeling.OnnxEntry`,
  with attention translated to ONNX Runtime's ``GroupQueryAttention`` (see
  :mod:`mobile_export.ort_attention`) and ONNX Runtime GenAI's input/output names.
- **Fusions**: onnxscript's optimizer and ONNX Runtime fusion rules
  (``onnxscript.rewriter.ort_fusions``): RMSNorm → ``SimplifiedLayerNormalization``, residual
  add + RMSNorm → ``SkipSimplifiedLayerNormalization``, and the rest of its rule set. A rule that
  finds nothing leaves the graph as it was; the counts say which applied.
- **Quantization**: :mod:`mobile_export.backends.onnx_quant`.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mobile_export.console import quiet_loggers
from mobile_export.errors import UserError

PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"
DEFAULT_OPSET = 18  # torch.onnx's dynamo exporter writes opset 18 and newer
EXTERNAL_DATA = "model.onnx.data"

# The ONNX Runtime release that added each contrib op (or the attribute named) we emit.
FUSED_OP_MIN_ORT: dict[str, str] = {
    "SimplifiedLayerNormalization": "1.10",
    "SkipSimplifiedLayerNormalization": "1.13",
    "GroupQueryAttention": "1.17",
    "MatMulNBits": "1.17",
    "GroupQueryAttention.softcap": "1.20",
    "GatherBlockQuantized": "1.20",
}


@dataclass
class GraphReport:
    """What export, fusion and quantization did to the graph."""

    opset: int = DEFAULT_OPSET
    fusions: dict[str, int] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    tied_embedding_shared: bool = False
    node_plan: dict[str, int] = field(default_factory=dict)  # "4-bit b32": nodes quantized so


def kv_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Past input names and present output names, keys and values interleaved per layer."""
    past, present = [], []
    for i in range(n_layers):
        past += [PAST_KEY % i, PAST_VALUE % i]
        present += [PRESENT_KEY % i, PRESENT_VALUE % i]
    return past, present


def export_graph(decoder, opset: int, ui):
    """``torch.onnx.export`` (dynamo) of the decoder in ONNX Runtime GenAI's calling convention.

    Returns an ``onnx_ir`` model. Export failures name the layer and op when torch says them.
    """
    from mobile_export.modeling import OnnxEntry
    from mobile_export.ort_attention import onnx_translation_table

    entry = OnnxEntry(decoder).eval()
    attn = decoder.layers[0].self_attn
    n_layers = len(decoder.layers)
    max_seq_len = decoder.max_seq_len
    past_len, seq_len = 3, 5  # sizes above 1 keep both dimensions symbolic while tracing
    dtype = decoder.embed_tokens.weight.dtype
    past = tuple(torch.zeros(1, attn.n_kv_heads, past_len, attn.head_dim, dtype=dtype) for _ in range(2 * n_layers))
    args = (
        torch.zeros(1, seq_len, dtype=torch.long),
        torch.ones(1, past_len + seq_len, dtype=torch.long),
        *past,
    )
    seq = torch.export.Dim("sequence_length", min=1, max=max_seq_len)
    total = torch.export.Dim("total_sequence_length", min=1, max=max_seq_len)
    past_dim = torch.export.Dim("past_sequence_length", min=0, max=max_seq_len - 1)
    past_names, present_names = kv_names(n_layers)
    ui.update("torch.onnx.export (dynamo)")
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                entry,
                args,
                dynamo=True,
                custom_translation_table=onnx_translation_table(),
                input_names=["input_ids", "attention_mask", *past_names],
                output_names=["logits", *present_names],
                dynamic_shapes=({1: seq}, {1: total}, tuple({2: past_dim} for _ in past_names)),
                opset_version=opset,
                optimize=False,  # fuse() runs onnxscript's optimizer before the fusion rules anyway
                verbose=False,
            )
    except Exception as exc:  # torch.onnx wraps every failure; its summary names the node
        raise UserError(
            f"ONNX export failed for this architecture: {_export_failure(exc)}",
            hint="report the model type and this message; other backends may still build it",
        ) from exc
    return program.model


def _export_failure(exc: Exception) -> str:
    """The most specific line of a torch.onnx error (the failing node and op)."""
    text = str(exc)
    for line in text.splitlines():
        if "Error when translating node" in line or "Unsupported" in line or "No decomposition" in line:
            return line.strip()[:300]
    cause = exc.__cause__ or exc.__context__
    return (str(cause) if cause else text).splitlines()[0][:300]


class _quiet_exporter:
    """Silence torch.onnx's progress prints and warnings (the build prints its own progress)."""

    def __enter__(self):
        import contextlib
        import io
        import warnings

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        self._stack.enter_context(quiet_loggers("torch.onnx", "onnxscript", "torch.export", "torch._dynamo"))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


def fuse(model) -> dict[str, int]:
    """onnxscript's ONNX Runtime fusions, in place; returns the count of each fusion that applied."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with _quiet_exporter():
        _, counts = optimize_for_ort(model)
    return {name: int(n) for name, n in counts.items() if n}


def op_counts(graph) -> dict[str, int]:
    """Op types in an ``onnx`` GraphProto, contrib ops prefixed with their domain."""
    counts = collections.Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in graph.node)
    return dict(sorted(counts.items()))


def min_onnxruntime(ops: list[str]) -> str:
    """The oldest ONNX Runtime release that has every op named (FUSED_OP_MIN_ORT keys)."""
    return max((FUSED_OP_MIN_ORT[op] for op in ops), key=_version_key, default="1.10")


def ops_needing_versions(counts: dict[str, int], softcap: bool) -> list[str]:
    """FUSED_OP_MIN_ORT keys for the contrib ops in a graph's op counts."""
    ops = [op.rsplit(".", 1)[-1] for op in counts if op.rsplit(".", 1)[-1] in FUSED_OP_MIN_ORT]
    return ops + (["GroupQueryAttention.softcap"] if softcap else [])


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def check_min_onnxruntime(wanted: str, ops: list[str]) -> None:
    """Refuse when an op (a FUSED_OP_MIN_ORT key) needs a newer ONNX Runtime than ``wanted``, naming it."""
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", wanted):
        raise UserError(f"--min-onnxruntime '{wanted}' is not a version", hint="pass e.g. --min-onnxruntime 1.20")
    too_new = [(op, FUSED_OP_MIN_ORT[op]) for op in ops if _version_key(FUSED_OP_MIN_ORT[op]) > _version_key(wanted)]
    if too_new:
        op, needed = max(too_new, key=lambda item: _version_key(item[1]))
        raise UserError(
            f"ONNX Runtime {wanted} is too old for {op.replace('.', ' attribute ')} (added in {needed})",
            hint=f"pass --min-onnxruntime {needed} or newer, or a scheme without that op",
        )


def save(proto, out_dir: Path) -> Path:
    """Write ``model.onnx`` with its weights in one external data file beside it."""
    import onnx

    path = out_dir / "model.onnx"
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA,
        size_threshold=1024,
    )
    return path
