"""The ONNX graph of a decoder: export, fusions, quantization, saving; each step reports what it did.

- **Export**: ``torch.onnx.export(..., dynamo=True)`` of :class:`~mobile_export.modeling.OnnxEntry`,
  with attention translated to ONNX Runtime's ``GroupQueryAttention`` (see
  :mod:`mobile_export.ort_attention`) and ONNX Runtime GenAI's input/output names.
- **Fusions**: onnxscript's optimizer and ONNX Runtime fusion rules
  (``onnxscript.rewriter.ort_fusions``): RMSNorm → ``SimplifiedLayerNormalization``, residual
  add + RMSNorm → ``SkipSimplifiedLayerNormalization``, and the rest of its rule set. A rule that
  finds nothing leaves the graph as it was; the counts say which applied.
- **Quantization** with ONNX Runtime's own ``MatMulNBitsQuantizer``: block-wise int4 or int8
  ``MatMulNBits`` (accuracy level 4: int8 activations on CPU) and ``GatherBlockQuantized``
  embeddings; a tied embedding reads the LM head's quantized table instead of a second copy.
"""

from __future__ import annotations

import collections
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mobile_export.errors import UserError

PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"
DEFAULT_OPSET = 18  # torch.onnx's dynamo exporter writes opset 18 and newer
EXTERNAL_DATA = "model.onnx.data"
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations on CPU (what ONNX Runtime GenAI's builder uses)

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
        for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo"):
            logger = logging.getLogger(name)
            self._stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
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


def _initializers(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def _tied_table(graph) -> tuple[object, object] | tuple[None, None]:
    """The embedding Gather and LM-head MatMul when they read the same table (tied weights).

    After export a tied table appears once as the Gather's initializer and once transposed
    for the MatMul; they are recognised by value.
    """
    import numpy as np
    from onnx import numpy_helper

    inits = _initializers(graph)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]
    for gather in gathers:
        table = numpy_helper.to_array(inits[gather.input[0]])
        if table.ndim != 2:
            continue
        for matmul in matmuls:
            weight = inits[matmul.input[1]]
            if list(weight.dims) == [table.shape[1], table.shape[0]]:
                if np.array_equal(numpy_helper.to_array(weight).T, table):
                    return gather, matmul
    return None, None


def untie_for_export(decoder) -> bool:
    """Give the LM head its own copy of a tied embedding table (so the exporter folds its transpose
    into a plain MatMul weight that ONNX Runtime's quantizer takes). Returns whether it was tied."""
    head, embed = decoder.lm_head, decoder.embed_tokens
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    return True


def quantize(proto, spec, report: GraphReport, tied: bool, n_layers: int) -> object:
    """Quantize MatMul (and embedding Gather) weights with ONNX Runtime's ``MatMulNBitsQuantizer``.

    ``spec`` is a QuantSpec: ``int4`` (blocks of ``group_size``, or of the ``group_sizes`` pattern
    naming a layer) or ``int8`` linears, the ``--keep-8bit`` layers at 8 bits, ``fp16`` weight
    storage, or ``fp32``; embeddings by ``spec.embedding``. A LM head that shares the embedding
    table takes the embedding's blocks (``embedding_group_size``), since one table serves both.
    """
    _unfuse_weight_matmuls(proto)
    gather, head = _tied_table(proto.graph) if tied else (None, None)
    share = tied and gather is not None and spec.scheme == spec.embedding == "int4"
    if spec.scheme in ("int4", "int8"):
        plan = node_plan(proto.graph, spec, n_layers, head.name if share and head is not None else None)
        report.node_plan = {f"{bits}-bit b{block}": len(names) for (bits, block), names in sorted(plan.items())}
        hqq = getattr(spec, "algo", "rtn") == "hqq"
        for (bits, block), names in sorted(plan.items()):
            proto = _matmul_nbits(proto, bits=bits, block=block, ops=("MatMul",), hqq=hqq, only=names)
    else:
        if gather is not None:
            _retie_head(proto, gather, head)
        if spec.scheme == "fp16":
            _fp16_weights(proto)
    if spec.embedding == "int4":  # ONNX Runtime's quantizer writes 4-bit tables only
        shared = share and _share_tied_embedding(proto, gather, head, spec.embedding_groups)
        report.tied_embedding_shared = bool(shared)
        if not shared:
            proto = _matmul_nbits(proto, bits=4, block=spec.embedding_groups, ops=("Gather",))
    return proto


def module_name(node) -> str | None:
    """The decoder module a node came from (``layers.3.mlp.down_proj``, ``lm_head``), read from the
    name scopes torch.onnx records on every node; None for nodes of no module."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            if len(scopes) >= 2:
                return scopes[-2].removeprefix("decoder.")
    return None


def _logits_width(graph) -> int | None:
    """The vocabulary width of the ``logits`` output, when the graph states it."""
    for output in graph.output:
        if output.name == "logits":
            dims = output.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return int(dims[-1].dim_value)
    return None


def layer_parts(name: str) -> list[str]:
    """The projections one module computes: a fused ``qkv_proj`` is its q, k and v."""
    if name.endswith(".qkv_proj"):
        return [name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
    return [name]


def layer_quant(spec, name: str, n_layers: int) -> tuple[int, int]:
    """(bits, block size) of one linear: 8 bits where ``--keep-8bit`` names it, the block size of
    the ``group_sizes`` pattern naming it, else the scheme's."""
    from mobile_export.quantize import keep_8bit_matcher, linear_bits, linear_group

    keep = keep_8bit_matcher(spec.keep_8bit, n_layers) if spec.keep_8bit else None
    return linear_bits(spec, name, keep), linear_group(spec, name, n_layers)


def node_plan(graph, spec, n_layers: int, shared_head: str | None) -> dict[tuple[int, int], list[str]]:
    """MatMul node names with weights to quantize, by (bits, block size); ``shared_head`` (the LM
    head's node when the embedding will read its blocks) takes the embedding's block size."""
    inits = {t.name: t for t in graph.initializer}
    vocab = _logits_width(graph)
    plan: dict[tuple[int, int], list[str]] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        # onnxscript's fused nodes carry no module name; the LM head is known by its width
        head = vocab is not None and list(inits[node.input[1]].dims)[-1:] == [vocab]
        name = module_name(node) or ("lm_head" if head else "")
        choices = {layer_quant(spec, part, n_layers) for part in layer_parts(name)}
        if len(choices) > 1:  # the backend splits such projections before export
            raise RuntimeError(f"{name} fuses projections quantized differently: {sorted(choices)}")
        bits, block = choices.pop()
        if node.name == shared_head:
            block = spec.embedding_groups
        plan.setdefault((bits, block), []).append(node.name)
    return plan


def _retie_head(proto, gather, head) -> None:
    """Let an unquantized LM head read the embedding table itself (``FusedMatMul`` with transB)
    instead of its transposed copy, so a tied table is stored once."""
    from onnx import helper

    copy = head.input[1]
    fused = helper.make_node(
        "FusedMatMul", [head.input[0], gather.input[0]], list(head.output), name=f"{head.name}_tied",
        domain="com.microsoft", transB=1, alpha=1.0,
    )  # fmt: skip
    nodes = [fused if n is head else n for n in proto.graph.node]
    proto.graph.ClearField("node")
    proto.graph.node.extend(nodes)
    if not any(copy in n.input for n in proto.graph.node):
        kept = [t for t in proto.graph.initializer if t.name != copy]
        proto.graph.ClearField("initializer")
        proto.graph.initializer.extend(kept)


def _unfuse_weight_matmuls(proto) -> None:
    """Turn ``FusedMatMul(x, W, alpha)`` with a weight initializer back into ``MatMul`` + ``Mul``.

    onnxscript folds a scalar multiply into FusedMatMul (Gemma 2's logit soft-capping divides
    the LM head's output); ONNX Runtime's quantizer only takes MatMul, so the head would stay fp32.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    inits = _initializers(proto.graph)
    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = not any(attrs.get(k, 0) for k in ("transA", "transB", "transBatchA", "transBatchB"))
        if node.op_type != "FusedMatMul" or node.domain != "com.microsoft" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        product = f"{node.output[0]}_unscaled"
        alpha = f"{node.output[0]}_alpha"
        proto.graph.initializer.append(numpy_helper.from_array(np.array(attrs.get("alpha", 1.0), np.float32), alpha))
        matmul = helper.make_node("MatMul", list(node.input[:2]), [product], name=f"{node.name}_matmul")
        matmul.metadata_props.extend(node.metadata_props)  # keeps the module name for per-layer rules
        nodes.append(matmul)
        nodes.append(helper.make_node("Mul", [product, alpha], list(node.output), name=f"{node.name}_alpha"))
    proto.graph.ClearField("node")
    proto.graph.node.extend(nodes)


def _matmul_nbits(proto, bits: int, block: int, ops: tuple[str, ...], hqq: bool = False, only=None):
    """ONNX Runtime's quantizer: round-to-nearest symmetric blocks, or HQQ (asymmetric blocks with
    fp zero points chosen by half-quadratic optimisation, arXiv:2309.15531; MatMul only).
    ``only``: the node names to quantize in this pass (the others of ``ops`` are left as they are)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if hqq:
        config = HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=ops)
    else:
        config = DefaultWeightOnlyQuantConfig(
            block_size=block,
            is_symmetric=True,
            accuracy_level=ACCURACY_LEVEL,
            op_types_to_quantize=ops,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
            bits=bits,
        )
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        kept = [n.name for n in proto.graph.node if n.op_type in ops and n.name not in only] if only else []
        quantizer = MatMulNBitsQuantizer(proto, algo_config=config, nodes_to_exclude=kept)
        quantizer.process()
    finally:
        quiet.setLevel(level)
    return quantizer.model.model


def _share_tied_embedding(proto, gather, head, block: int) -> bool:
    """Point the embedding at the LM head's int4/int8 blocks (``GatherBlockQuantized``).

    MatMulNBits stores the head [vocab, hidden] row-major in blocks along hidden, the layout
    GatherBlockQuantized reads with ``quantize_axis=1``; only a reshape is needed.
    """
    from onnx import helper, numpy_helper

    inits = _initializers(proto.graph)
    nbits = next(
        (n for n in proto.graph.node if n.op_type == "MatMulNBits" and head.output[0] in n.output),
        None,
    )
    if nbits is None:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in nbits.attribute}
    data, scales = nbits.input[1], nbits.input[2]
    if data not in inits or scales not in inits or len(nbits.input) > 3 and nbits.input[3]:
        return False
    vocab = attrs["N"]
    shape_name = f"{data}_as_table_shape"
    proto.graph.initializer.append(numpy_helper.from_array(_int64([vocab, -1]), shape_name))
    table = f"{data}_as_table"
    nodes = list(proto.graph.node)
    index = nodes.index(gather)
    reshape = helper.make_node("Reshape", [data, shape_name], [table], name=f"{gather.name}_shared_table")
    lookup = helper.make_node(
        "GatherBlockQuantized",
        [table, gather.input[1], scales],
        list(gather.output),
        name=f"{gather.name}_quantized",
        domain="com.microsoft",
        bits=attrs["bits"],
        block_size=block,
        gather_axis=0,
        quantize_axis=1,
    )
    nodes[index : index + 1] = [reshape, lookup]
    proto.graph.ClearField("node")
    proto.graph.node.extend(nodes)
    old = gather.input[0]
    if not any(old in n.input for n in proto.graph.node):
        kept = [t for t in proto.graph.initializer if t.name != old]
        proto.graph.ClearField("initializer")
        proto.graph.initializer.extend(kept)
    return True


def _int64(values: list[int]):
    import numpy as np

    return np.array(values, dtype=np.int64)


def _fp16_weights(proto) -> None:
    """Store MatMul/Gather weight tables in fp16 with a Cast back to fp32 (half the file; fp32 compute)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = _initializers(proto.graph)
    converted: dict[str, str] = {}
    nodes = []
    for node in proto.graph.node:
        slot = 1 if node.op_type in ("MatMul", "FusedMatMul") else 0 if node.op_type == "Gather" else None
        name = node.input[slot] if slot is not None and len(node.input) > slot else None
        tensor = inits.get(name) if name else None
        if tensor is not None and tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == 2:
            if name not in converted:
                half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), f"{name}_fp16")
                proto.graph.initializer.append(half)
                cast_out = f"{name}_fp32"
                nodes.append(
                    helper.make_node("Cast", [half.name], [cast_out], name=f"{name}_cast", to=TensorProto.FLOAT)
                )
                converted[name] = cast_out
            node.input[slot] = converted[name]
        nodes.append(node)
    proto.graph.ClearField("node")
    proto.graph.node.extend(nodes)
    kept = [t for t in proto.graph.initializer if t.name not in converted]
    proto.graph.ClearField("initializer")
    proto.graph.initializer.extend(kept)


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
