"""Quantization of an exported ONNX decoder graph with ONNX Runtime's own ``MatMulNBitsQuantizer``.

Block-wise int4 or int8 ``MatMulNBits`` (accuracy level 4: int8 activations on CPU) and
``GatherBlockQuantized`` embeddings; a tied embedding reads the LM head's quantized table instead
of a second copy. Layers may differ (``--keep-8bit``, ``--group-size-for``): the quantizer runs
once per (bits, block size) on the nodes that take them, nodes named by the module torch.onnx
recorded on each.
"""

from __future__ import annotations

import logging

import torch

from mobile_export.backends.onnx_graph import GraphReport
from mobile_export.console import quiet_loggers
from mobile_export.quantize import keep_8bit_matcher, linear_bits, linear_group, projection_parts

ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations on CPU (what ONNX Runtime GenAI's builder uses)


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


def layer_quant(spec, name: str, n_layers: int) -> tuple[int, int]:
    """(bits, block size) of one linear: 8 bits where ``--keep-8bit`` names it, the block size of
    the ``group_sizes`` pattern naming it, else the scheme's."""
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
        choices = {layer_quant(spec, part, n_layers) for part in projection_parts(name)}
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
    with quiet_loggers("onnxruntime.quantization", level=logging.WARNING):
        kept = [n.name for n in proto.graph.node if n.op_type in ops and n.name not in only] if only else []
        quantizer = MatMulNBitsQuantizer(proto, algo_config=config, nodes_to_exclude=kept)
        quantizer.process()
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
