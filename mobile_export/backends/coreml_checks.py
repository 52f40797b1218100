"""Checks a saved Core ML package on any OS: its spec, how its weights are stored, and the weights themselves.

Everything here is read from the written ``.mlpackage`` (the protobuf spec and the MIL program
with its weight file), never from what the converter was asked to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

WEIGHT_THRESHOLD = 512  # linear/embedding weights with more elements are compressed (all of a real model's)
# MIL op that produces a compressed weight -> short name of the storage
COMPRESSED_OPS = {
    "constexpr_blockwise_shift_scale": "quantized",
    "constexpr_lut_to_dense": "palettized",
}


@dataclass
class Package:
    """A saved package's spec and MIL program."""

    path: Path
    spec: object
    program: object

    @property
    def ops(self) -> list:
        return list(self.program.functions["main"].operations)


def read_package(path: Path) -> Package:
    """Load a package's spec and MIL program without compiling it (works on Linux)."""
    from mobile_export.runtimes.coreml import import_coremltools, quiet_coremltools

    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    with quiet_coremltools():
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        program = load_mil(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    return Package(path=path, spec=spec, program=program)


def _feature_shape(feature) -> tuple[str, list]:
    """(dtype, shape) of a spec feature; flexible dims become 'lo..hi'."""
    array = feature.type.stateType.arrayType if feature.type.HasField("stateType") else feature.type.multiArrayType
    dtype = type(array).ArrayDataType.Name(array.dataType).lower()  # FLOAT16 -> float16, INT32 -> int32
    if array.HasField("shapeRange") and array.shapeRange.sizeRanges:
        shape = [
            int(r.lowerBound) if r.lowerBound == r.upperBound else f"{r.lowerBound}..{r.upperBound}"
            for r in array.shapeRange.sizeRanges
        ]
    else:
        shape = [int(d) for d in array.shape]
    return dtype, shape


def _matches(expected, dtype: str, shape: list) -> bool:
    if expected.dtype != dtype or len(expected.shape) != len(shape):
        return False
    for want, got in zip(expected.shape, shape, strict=True):
        if isinstance(want, int) and want != got:
            return False
        if isinstance(want, str) and not (isinstance(got, str) and got.startswith("1..")):
            return False  # a symbolic dim must be a flexible range starting at 1
    return True


def check_io(package: Package, inputs: list, outputs: list, states: list) -> list[str]:
    """Problems where the package's inputs, outputs or states differ from the manifest's."""
    description = package.spec.description
    problems = []
    for kind, expected, features in (
        ("input", inputs, description.input),
        ("output", outputs, description.output),
        ("state", states, description.state),
    ):
        found = {f.name: _feature_shape(f) for f in features}
        if set(found) != {e.name for e in expected}:
            problems.append(
                f"package {kind}s {sorted(found)} differ from the manifest's {sorted(e.name for e in expected)}"
            )
            continue
        for spec in expected:
            dtype, shape = found[spec.name]
            if kind == "output" and dtype == "float16" and shape == []:
                continue  # outputs carry no shape in the spec unless declared
            if not _matches(spec, dtype, shape):
                problems.append(f"package {kind} {spec.name} is {dtype}{shape}, manifest says {spec.dtype}{spec.shape}")
    return problems


def _dtype_name(var) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def describe_weight(op) -> str | None:
    """How a compressed weight is stored, e.g. 'int4 blocks of 32', 'int8 per channel', 'lut 16'."""
    if op.op_type == "constexpr_blockwise_shift_scale":
        data, scale = op.inputs["data"], op.inputs["scale"]
        dtype = _dtype_name(data)
        in_features = data.shape[-1]
        blocks = scale.shape[-1]
        if blocks == 1:
            return f"{dtype} per channel"
        return f"{dtype} blocks of {in_features // blocks}"
    if op.op_type == "constexpr_lut_to_dense":
        lut = op.inputs["lut"]
        rows = op.outputs[0].shape[0]
        return f"lut {lut.shape[-2]} entries, {rows // lut.shape[0]}-channel groups"
    return None


def expected_storage(scheme: str, group_size: int) -> str | None:
    """The storage description :func:`describe_weight` gives for a scheme (None: uncompressed)."""
    if scheme == "int4":
        return f"int4 blocks of {group_size}"
    if scheme == "int8":
        return "int8 per channel"
    if scheme.startswith("palettize"):
        return f"lut {2 ** int(scheme.removeprefix('palettize'))} entries"
    return None


def embedding_storage(spec, tied: bool) -> str:
    """How the embedding table is stored: its own setting, or the head's scheme when they share it."""
    return spec.scheme if tied else spec.embedding


def _weight_source(op_input):
    return op_input.op if op_input is not None and op_input.op is not None else None


def check_compression(package: Package, spec, tied: bool = False) -> tuple[dict, list[str]]:
    """Count how every linear and embedding weight is stored; problems where that is not the scheme.

    Weights smaller than the compression threshold (e.g. tiny heads) are reported, not failed.
    """
    want_linear = expected_storage(spec.scheme, spec.group_size)
    embedding_scheme = embedding_storage(spec, tied)
    want_embedding = expected_storage(embedding_scheme, spec.group_size) if embedding_scheme != "none" else None
    counts: dict[str, int] = {}
    problems: list[str] = []
    embedding = None
    kept_8bit = bool(getattr(spec, "keep_8bit", ()))  # --keep-8bit layers are int8 per channel
    for op in package.ops:
        if op.op_type not in ("linear", "gather"):
            continue
        source = _weight_source(op.inputs.get("weight") if op.op_type == "linear" else op.inputs.get("x"))
        if source is None or (source.op_type != "const" and source.op_type not in COMPRESSED_OPS):
            continue  # activations, and gathers of shapes
        if op.op_type == "gather" and len(source.outputs[0].shape) != 2:
            continue
        described = describe_weight(source) or f"{_dtype_name(source.outputs[0])} (uncompressed)"
        size = int(np.prod(source.outputs[0].shape))
        if op.op_type == "gather":
            embedding = described
            want = want_embedding
            if want is None and source.op_type == "const":
                continue
        else:
            counts[described] = counts.get(described, 0) + 1
            want = want_linear
        if want is None:
            if source.op_type != "const":
                problems.append(f"{source.name} is {described}, expected uncompressed")
        elif not (described.startswith(want) or (kept_8bit and described == "int8 per channel")):
            if size > WEIGHT_THRESHOLD:
                problems.append(f"{source.name} is stored as {described}, expected {want}")
    if not counts:
        problems.append("the package has no linear layers to check")
    return {"linear_weights": counts, "embedding": embedding, "expected": want_linear}, problems


def _dense_value(op) -> np.ndarray:
    """A constexpr op's decompressed value, computed by coremltools' own op definition."""
    value = op.materialized_val_inference() if hasattr(op, "materialized_val_inference") else op.value_inference()
    return np.asarray(value)


def load_package_weights(package: Package, decoder: torch.nn.Module) -> int:
    """Copy the package's decompressed weights into ``decoder``'s parameters; returns how many.

    Const names come from the traced parameter paths (``decoder.layers.0.self_attn.q_proj.weight``
    -> ``decoder_layers_0_self_attn_q_proj_weight...``); every compressed weight must map to one.
    """
    params = {"decoder_" + name.replace(".", "_"): p for name, p in decoder.named_parameters()}
    keys = sorted(params, key=len, reverse=True)
    loaded = 0
    unmapped = []
    for op in package.ops:
        if op.op_type not in COMPRESSED_OPS:
            continue
        # "<param>_<suffix>" from ct.optimize passes; exactly "<param>" when the converter built the op
        # from compression info on the module (weights quantized before conversion, e.g. GPTQ)
        key = next((k for k in keys if op.name == k or op.name.startswith(k + "_")), None)
        if key is None:
            unmapped.append(op.name)
            continue
        value = torch.from_numpy(_dense_value(op).astype(np.float32))
        param = params[key]
        if tuple(value.shape) != tuple(param.shape):
            unmapped.append(f"{op.name} {tuple(value.shape)} vs {tuple(param.shape)}")
            continue
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        loaded += 1
    if unmapped:
        from mobile_export.errors import VerificationError

        raise VerificationError(
            f"{len(unmapped)} compressed weights in the package match no model parameter: {unmapped[0]}",
            hint="the package and the traced module disagree; report this with the recipe",
        )
    return loaded
