"""The per-layer pieces of the quantization driver (:mod:`.pipeline`): what one layer's stage is,
the context the algorithms share, the grid rounding and installation of chosen integers, and
GPTQ's and AWQ's work on one stage (one input, the linears reading it)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from mobile_export.quant_algos import awq, gptq
from mobile_export.quant_algos.calibration import (
    capture_inputs,
    stage_inputs,
)
from mobile_export.quant_algos.grid import (
    attach_coreml_quantization,
    group_scales,
    install_weight,
    qrange,
    quantize_grouped,
)
from mobile_export.quantize import (
    QuantReport,
    QuantSpec,
)

GPTQ_DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (the paper's 1%)
GPTQ_ACT_ORDER = True  # columns by decreasing Hessian diagonal, static groups (on par with off on the test model)


@dataclass
class Stage:
    """Linears that read one input, and what produces that input (for AWQ's folding)."""

    label: str
    linears: list[tuple[str, nn.Linear]]
    producer: nn.Module | None = None
    kind: str = "norm"  # "norm" (an ExportRMSNorm) or "linear" (scale its output rows)


@dataclass
class AlgoContext:
    """What the per-layer algorithms need besides the layer."""

    spec: QuantSpec
    report: QuantReport
    keep: object
    torch_quant: bool
    round_scale: object = None  # scales as the runtime stores them (bf16 for XNNPACK groups, fp16 Core ML)
    round_channels: bool = False  # also round per-channel scales
    tied_head: bool = False
    torch_grid: bool = False  # Core ML with hqq / --keep-8bit: integers chosen here, stored as they are
    awq_alphas: list[float] = field(default_factory=list)


def _bf16_scale(scale: torch.Tensor) -> torch.Tensor:
    """XNNPACK stores group-wise (qb4w) scales in bf16: choose integers against those values."""
    return scale.to(torch.bfloat16).float()


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Core ML packages store fp16 scales."""
    return scale.half().float()


def _grid_scales(ctx: AlgoContext, w: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """Scales [out, in / group] of the symmetric grid: HQQ's scale-only optimisation (torchao's)
    for ``hqq``, else round-to-nearest's group maxima."""
    if ctx.spec.algo != "hqq":
        return group_scales(w, group, bits)
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

    qmin, qmax = qrange(bits)
    _, scale = _choose_qparams_and_quantize_scale_only_hqq(w, [1, group], qmin, qmax)
    return scale.float().reshape(w.shape[0], w.shape[1] // group)


def _grid_install(ctx: AlgoContext, linear: nn.Linear, bits: int) -> None:
    """Choose a linear's integers and scales here (rounded as the converter stores the scales)
    and attach them for the converter."""
    group = _group(ctx, linear, bits)
    w = linear.weight.detach().float()
    _install_rounded(ctx, linear, w, _grid_scales(ctx, w, group, bits), group, bits)


def _install_rounded(ctx: AlgoContext, linear: nn.Linear, w: torch.Tensor, scale, group: int, bits: int) -> None:
    """Round ``scale`` as the runtime stores it, put ``w`` on that grid and install it."""
    rounding = _rounding(ctx, group, linear)
    if rounding is not None:
        scale = rounding(scale)
    _install(ctx, linear, quantize_grouped(w, scale, group, bits), scale, group, bits)


def layer_stages(layer: nn.Module, chosen: dict[str, int]) -> list[Stage]:
    """The layer's linears grouped by shared input, in forward order, with their input's producer."""
    modules = dict(layer.named_modules())
    norm2 = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in modules else "post_attention_layernorm"
    attn = modules.get("self_attn")
    mha = attn is not None and getattr(attn, "n_heads", None) == getattr(attn, "n_kv_heads", None)
    known = [
        ("attention input", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "norm"),
        ("attention output", ("self_attn.o_proj",), "self_attn.v_proj" if mha else None, "linear"),
        ("MLP input", ("mlp.gate_proj", "mlp.up_proj"), norm2, "norm"),
        ("MLP output", ("mlp.down_proj",), "mlp.up_proj", "linear"),
    ]
    stages, covered = [], set()
    for label, names, producer, kind in known:
        linears = [(n, modules[n]) for n in names if n in chosen]
        covered.update(names)
        if linears:
            stages.append(Stage(label, linears, modules.get(producer) if producer else None, kind))
    for name in chosen:
        if name not in covered:
            stages.append(Stage(name, [(name, modules[name])], None))
    return stages


def _group(ctx: AlgoContext, linear: nn.Linear, bits: int) -> int:
    """Group size of a linear: the scheme's for grouped 4-bit, the whole row for per-channel."""
    return ctx.spec.group_size if bits == 4 and ctx.spec.uses_groups else linear.in_features


def _rounding(ctx: AlgoContext, group: int, linear: nn.Linear):
    """How the runtime rounds this linear's scales (None: it keeps them in fp32)."""
    return ctx.round_scale if (group < linear.in_features or ctx.round_channels) else None


def _install(ctx: AlgoContext, linear: nn.Linear, qdata, scale, group: int, bits: int) -> None:
    if ctx.torch_quant:
        install_weight(linear, qdata, scale, group, bits, ctx.spec.dynamic_activation)
    else:  # Core ML: the converter stores these integers and scales as they are
        attach_coreml_quantization(linear, qdata, scale, group, bits)


def _gptq_stage(stage: Stage, inputs: list[torch.Tensor], chosen: dict[str, int], ctx: AlgoContext) -> None:
    """GPTQ for the linears of one stage from their (shared) inputs, given as tensors [.., in]."""
    hessian = gptq.Hessian(stage.linears[0][1].in_features)
    for x in inputs:
        hessian.add(x)
    _gptq_from_hessian(stage, hessian, chosen, ctx)


def _gptq_from_hessian(stage: Stage, hessian: gptq.Hessian, chosen: dict[str, int], ctx: AlgoContext) -> None:
    """GPTQ for a stage's linears: rows are independent under one Hessian, so linears with the
    same bits and grouping (q/k/v, gate/up) run as one stacked matrix."""
    batches: dict[tuple[int, int], list[nn.Linear]] = {}
    for name, linear in stage.linears:
        bits = chosen[name]
        batches.setdefault((bits, _group(ctx, linear, bits)), []).append(linear)
    for (bits, group), linears in batches.items():
        result = gptq.gptq_quantize(
            torch.cat([linear.weight.detach().float() for linear in linears]),
            hessian.matrix,
            group,
            bits,
            damp=GPTQ_DAMP,
            act_order=GPTQ_ACT_ORDER,
            round_scale=_rounding(ctx, group, linears[0]),
        )
        rows = [linear.out_features for linear in linears]
        for linear, qdata, scale in zip(linears, result.qdata.split(rows), result.scale.split(rows), strict=True):
            _install(ctx, linear, qdata, scale, group, bits)


def _gptq_layer(
    decoder, index: int, hidden: list[torch.Tensor], stages: list[Stage], chosen: dict[str, int], ctx: AlgoContext
) -> None:
    """True-sequential GPTQ: each stage's Hessian is taken after the earlier stages are quantized."""
    for stage in stages:
        hessian = gptq.Hessian(stage.linears[0][1].in_features)
        stage_inputs(decoder, index, hidden, [m for _, m in stage.linears], hessian.add)
        _gptq_from_hessian(stage, hessian, chosen, ctx)


def _awq_layer(
    decoder, index: int, hidden: list[torch.Tensor], stages: list[Stage], chosen: dict[str, int], ctx: AlgoContext
) -> None:
    """AWQ on one layer: capture every stage's input on the full-precision layer, search and fold
    the channel scales stage by stage, then clip and round each linear."""
    captured: list[list[torch.Tensor]] = [[] for _ in stages]
    with contextlib.ExitStack() as stack:
        for i, stage in enumerate(stages):
            stack.enter_context(capture_inputs([stage.linears[0][1]], captured[i].append, stop=False))
        for h in hidden:
            decoder.run_layer(index, h)
    inputs = [torch.cat(c) for c in captured]
    del captured
    for i, stage in enumerate(stages):
        inputs[i] = _awq_scale(stage, inputs[i], chosen, ctx)
    for stage, x in zip(stages, inputs, strict=True):
        _awq_round(stage, x, chosen, ctx)


def _awq_stage(stage: Stage, inputs: list[torch.Tensor], chosen: dict[str, int], ctx: AlgoContext) -> None:
    """AWQ for a lone stage (the LM head): scale and fold, then clip and round."""
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
    _awq_round(stage, _awq_scale(stage, x, chosen, ctx), chosen, ctx)


def _awq_scale(stage: Stage, x: torch.Tensor, chosen: dict[str, int], ctx: AlgoContext) -> torch.Tensor:
    """Search the stage's channel scales, fold them in; returns the stage's inputs as they now are."""
    if not _can_fold(stage):
        return x
    weights = [(linear.weight.detach(), _group(ctx, linear, chosen[n]), chosen[n]) for n, linear in stage.linears]
    s, alpha = awq.search_scales(x, weights)
    ctx.awq_alphas.append(alpha)
    if alpha == 0:
        return x
    _fold(stage, s)
    return x / s[None, :]


def _awq_round(stage: Stage, x: torch.Tensor, chosen: dict[str, int], ctx: AlgoContext) -> None:
    """Clip (not q/k: their errors pass through the softmax) and round the stage's linears."""
    for name, linear in stage.linears:
        bits = chosen[name]
        group = _group(ctx, linear, bits)
        w = linear.weight.detach().float()
        if name.endswith(("q_proj", "k_proj")):
            scale = group_scales(w, group, bits)
        else:
            scale = awq.search_clip(x, w, group, bits)
        _install_rounded(ctx, linear, w, scale, group, bits)


def _can_fold(stage: Stage) -> bool:
    from mobile_export.modeling import ExportRMSNorm

    if stage.producer is None:
        return False
    if stage.kind == "norm":
        return isinstance(stage.producer, ExportRMSNorm)
    return isinstance(stage.producer, nn.Linear) and not hasattr(stage.producer.weight, "qdata")


def _fold(stage: Stage, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the readers' input columns by it."""
    producer = stage.producer
    if stage.kind == "norm":
        producer.weight.data = (producer.weight.detach().float() / s).to(producer.weight.dtype)
    else:
        producer.weight.data = (producer.weight.detach().float() / s[:, None]).to(producer.weight.dtype)
        if producer.bias is not None:
            producer.bias.data = (producer.bias.detach().float() / s).to(producer.bias.dtype)
    for _, linear in stage.linears:
        linear.weight.data = (linear.weight.detach().float() * s[None, :]).to(linear.weight.dtype)
