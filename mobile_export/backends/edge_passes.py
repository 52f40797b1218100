"""``to_edge`` without the ATen-to-edge passes that have nothing to rewrite in the graph at hand.

ExecuTorch's ``to_edge`` runs a fixed list of passes, each re-tracing the whole program with fake
tensors and symbolic shapes (about 5 s a pass on a 30-layer 135M decoder). Five of them rewrite
only a pattern that can be read off the graph before they run; when it is absent, the pass
would return the same graph, so it is skipped. The others always run. Written here because
ExecuTorch has no such check; the gates follow each pass's source (ExecuTorch 1.5), and the
program is byte-identical with and without them (tests/test_lean_lowering.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _has_transpose(graph_module: torch.fx.GraphModule) -> bool:
    """NormalizeTransposePass rewrites ``aten.t`` only."""
    return any(node.target == torch.ops.aten.t.default for node in graph_module.graph.nodes)


def _has_view_op(graph_module: torch.fx.GraphModule) -> bool:
    """ReplaceBrokenOpsWithFunctionalOpsPass rewrites view ops (``OpOverload.is_view``) only."""
    return any(
        node.op == "call_function" and getattr(node.target, "is_view", False) for node in graph_module.graph.nodes
    )


def _symbol_as_tensor(graph_module: torch.fx.GraphModule) -> bool:
    """SymToTensorPass rewrites a SymInt/SymFloat/SymBool passed where the schema takes a Tensor."""
    symbolic = (torch.SymInt, torch.SymFloat, torch.SymBool)
    for node in graph_module.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for position, argument in enumerate(schema.arguments):
            # the pass looks at top-level arguments only (``exir.pass_base.map_args``)
            if argument.name in node.kwargs:
                value = node.kwargs[argument.name]
            elif not argument.kwarg_only and position < len(node.args):
                value = node.args[position]
            else:
                continue
            if (
                isinstance(value, torch.fx.Node)
                and isinstance(value.meta.get("val"), symbolic)
                and isinstance(argument.type, torch.TensorType)
            ):
                return True
    return False


def _promotion_rules() -> dict:
    from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND as KIND

    aten = torch.ops.aten
    return {
        aten.add.Tensor: KIND.DEFAULT,
        aten.mul.Tensor: KIND.DEFAULT,
        aten.sub.Tensor: KIND.DEFAULT,
        aten.div.Tensor: KIND.INT_TO_FLOAT,
        aten.div.Tensor_mode: KIND.DEFAULT,
        aten.minimum.default: KIND.DEFAULT,
    }


def _stand_in(value):
    """What RemoveMixedTypeOperators promotes with: a tensor for a node, a 0-d tensor for a symbol."""
    if isinstance(value, torch.fx.Node):
        value = value.meta.get("val")
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        dtype = {torch.SymInt: torch.int64, torch.SymFloat: torch.get_default_dtype(), torch.SymBool: torch.bool}
        return torch.empty((), dtype=dtype[type(value)])
    return value


def _mixed_types(graph_module: torch.fx.GraphModule) -> bool:
    """RemoveMixedTypeOperators casts an argument of a binary op (add, mul, sub, div, minimum)
    whose dtype is not the op's promoted dtype; true when some argument would be cast."""
    from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND as KIND
    from torch._prims_common import elementwise_dtypes

    rules = _promotion_rules()
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in rules or len(node.args) <= 1:
            continue
        kind = rules[node.target]
        if node.target == torch.ops.aten.div.Tensor_mode and node.kwargs.get("rounding_mode") is None:
            kind = KIND.INT_TO_FLOAT
        values = [_stand_in(arg) for arg in node.args]
        if any(value is None for value in values):
            return True  # no recorded value to judge by: let the pass decide
        promoted = elementwise_dtypes(*values, type_promotion_kind=kind)[1]
        for argument, value in zip(node.target._schema.arguments, values, strict=False):
            if isinstance(argument.type, torch.TensorType) and (
                not isinstance(value, torch.Tensor) or value.dtype != promoted
            ):
                return True
    return False


def _has_memory_format_op(graph_module: torch.fx.GraphModule) -> bool:
    """MemoryFormatOpsPass rewrites ``_to_copy``, ``empty`` and ``clone`` (edge ops) only."""
    from executorch.exir.passes.dim_order_ops_registry import DimOrderOpsMap

    return any(node.target in DimOrderOpsMap for node in graph_module.graph.nodes)


GATES = {
    "NormalizeTransposePass": _has_transpose,
    "ReplaceBrokenOpsWithFunctionalOpsPass": _has_view_op,
    "SymToTensorPass": _symbol_as_tensor,
    "RemoveMixedTypeOperators": _mixed_types,
}


class _Gated:
    """A pass that runs only when its gate finds something to rewrite."""

    def __init__(self, inner, gate) -> None:
        self.inner, self.gate = inner, gate

    def __call__(self, graph_module: torch.fx.GraphModule):
        from torch.fx.passes.infra.pass_base import PassResult

        if not self.gate(graph_module):
            return PassResult(graph_module, False)
        return self.inner(graph_module)


@contextlib.contextmanager
def gated_edge_passes() -> Iterator[None]:
    """While the block runs ``to_edge``, the passes of :data:`GATES` run only where they apply."""
    from executorch.exir.program import _program

    original = _program._get_aten_to_edge_passes

    def gated(config):
        pre, post = original(config)
        # ExecuTorch's pass manager wraps each pass in a function named after the pass's class
        names = [getattr(p, "__name__", type(p).__name__) for p in pre]
        return [_Gated(p, GATES[n]) if n in GATES else p for p, n in zip(pre, names, strict=True)], post

    memory_format_pass = _program.MemoryFormatOpsPass

    def gated_memory_format_pass():
        return _Gated(memory_format_pass(), _has_memory_format_op)

    # ``_generate_edge_program`` appends MemoryFormatOpsPass itself, after OpReplacePass
    _program._get_aten_to_edge_passes = gated
    _program.MemoryFormatOpsPass = gated_memory_format_pass
    try:
        yield
    finally:
        _program._get_aten_to_edge_passes = original
        _program.MemoryFormatOpsPass = memory_format_pass
