"""The layer-by-layer quantization driver ``stages.convert`` calls.

One pass over the decoder, one layer in memory at full precision at a time:

1. ``--rotate``: RMSNorms are swapped for their export form, the LM head is untied from the
   embedding, and embedding, each layer and the head are rotated as they come
   (:mod:`.rotation`).
2. The embedding is quantized first, so calibration activations start from what the
   quantized model sees.
3. Each layer: ``rtn``/``hqq`` quantize with torchao; ``gptq`` quantizes the layer's linears
   stage by stage in forward order (q/k/v, then o on the outputs of the quantized q/k/v, then
   gate/up, then down), each from the Hessian of its inputs captured on the calibration
   windows; ``awq`` captures every stage's inputs once, searches and folds the channel scales,
   then clips and rounds. The windows then pass through the quantized layer to become the
   next layer's inputs.
4. The LM head, likewise, from the final norm's outputs.

Integers and scales go to torchao's intx tensors (:func:`.grid.install_weight`), so export
and lowering see the same program as round-to-nearest builds. Scales are first rounded to what
the runtime stores (bf16 for XNNPACK's qb4w groups), so GPTQ's error feedback and AWQ's search
see the weights the device computes with. For Core ML, which compresses after conversion, the
chosen integers and fp16 scales ride along as coremltools' compression-info buffers
(:func:`.grid.attach_coreml_quantization`) and the converter stores exactly them; a LM head
that shares the embedding table is rounded on the same grid for both, so the table stays shared.
Core ML ``hqq`` and ``--keep-8bit`` go the same way: torchao's scale-only HQQ (or the group
maxima) picks each linear's scales here, at the bits the patterns ask for.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from mobile_export.memory import release_memory
from mobile_export.quant_algos import awq, gptq
from mobile_export.quant_algos.calibration import (
    Calibration,
    capture_inputs,
    embed_windows,
    next_hidden,
    stage_inputs,
)
from mobile_export.quant_algos.grid import (
    attach_coreml_quantization,
    group_scales,
    install_weight,
    qrange,
    quantize_grouped,
)
from mobile_export.quant_algos.rotation import (
    check_layer,
    check_rotatable,
    hadamard,
    make_rotation,
    rotate_embedding,
    rotate_head,
    rotate_layer,
)
from mobile_export.quant_algos.support import check_keep_patterns, linear_names
from mobile_export.quantize import (
    CALIBRATED,
    QuantReport,
    QuantSpec,
    keep_8bit_matcher,
    linear_bits,
    quantize_embedding,
    quantize_module,
    select_linears,
    untie_lm_head,
)
from mobile_export.runtimes.executorch import native_output_silenced

# What each backend's quantization path can take; a backend may declare ``quant_algos`` itself.
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


def orthogonal_label(n: int) -> str:
    """How the rotation of width ``n`` is built."""
    found = hadamard(n)
    return found[1] if found else f"random orthogonal {n}"


def quantize_decoder(
    decoder, spec: QuantSpec, report: QuantReport, backend, ui, calibration: Calibration | None
) -> None:
    """Prepare (rotate), quantize and cast every layer of an ``ExportableDecoder`` in place."""
    torch_quant = backend.quantizes_in_torch and spec.is_quantized
    n_layers = len(decoder.layers)
    keep = keep_8bit_matcher(spec.keep_8bit, n_layers) if spec.keep_8bit else None
    check_keep_patterns(decoder, spec)
    ctx = AlgoContext(spec=spec, report=report, keep=keep, torch_quant=torch_quant)
    ctx.torch_grid = (
        backend.torch_grid
        and spec.scheme in ("int4", "int8")
        and spec.algo not in CALIBRATED
        and (spec.algo == "hqq" or bool(spec.keep_8bit))
    )
    if keep is not None and not backend.quantizes_in_torch and not ctx.torch_grid:  # the converter keeps them
        report.kept_8bit = [n for n in linear_names(decoder) if n != "embed_tokens" and keep(n)]
    if torch_quant and spec.dynamic_activation and spec.uses_groups:
        ctx.round_scale = _bf16_scale
    elif not backend.quantizes_in_torch:
        ctx.round_scale, ctx.round_channels = _fp16_scale, True
    rotation = None
    if spec.rotate or spec.algo == "awq":
        if spec.rotate:
            check_rotatable(decoder.config)
        decoder.prepare_for_export()  # norms as ExportRMSNorm: plain multipliers to fold into
    tied = decoder.lm_head.weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()
    ctx.tied_head = tied and not (torch_quant or spec.rotate)
    if torch_quant or spec.rotate:
        untie_lm_head(decoder.lm_head, decoder.embed_tokens)
    if spec.rotate:
        attn = decoder.layers[0].self_attn
        rotation = make_rotation(int(decoder.config.hidden_size), int(attn.head_dim))
        decoder.embed_tokens.float()
        rotate_embedding(decoder.embed_tokens, rotation)
        report.details["rotation"] = {
            "residual": rotation.kind,
            "per_head": orthogonal_label(int(attn.head_dim)),
            "seed": rotation.seed,
            "untied_lm_head": tied,
        }
    if backend.quantizes_in_torch:
        quantize_embedding(decoder.embed_tokens, spec, report, keep)  # (or just cast to fp32)
    calibrated = spec.algo in CALIBRATED
    # ExecuTorch's LLM ops log a line to stdout per eager call; calibration makes thousands
    with native_output_silenced() if calibrated else contextlib.nullcontext():
        _quantize_layers(decoder, ctx, backend, ui, rotation, calibration)
    release_memory()


def _quantize_layers(decoder, ctx: AlgoContext, backend, ui, rotation, calibration: Calibration | None) -> None:
    spec, report, keep = ctx.spec, ctx.report, ctx.keep
    n_layers = len(decoder.layers)
    calibrated = spec.algo in CALIBRATED
    hidden = embed_windows(decoder, calibration) if calibrated else None
    for index, layer in enumerate(decoder.layers):
        ui.update(f"layer {index + 1}/{n_layers}" + (f" ({spec.algo})" if calibrated else ""))
        layer.float()
        if rotation is not None:
            check_layer(layer)
            rotate_layer(layer, rotation)
        prefix = f"layers.{index}."
        if calibrated:
            chosen = select_linears(layer, spec, report, prefix, keep)
            stages = layer_stages(layer, chosen)
            if spec.algo == "gptq":
                _gptq_layer(decoder, index, hidden, stages, chosen, ctx)
            else:
                _awq_layer(decoder, index, hidden, stages, chosen, ctx)
            report.quantized_linears += len(chosen)
            hidden = next_hidden(decoder, index, hidden)
        elif ctx.torch_grid:
            chosen = select_linears(layer, spec, report, prefix, keep)
            for name, bits in chosen.items():
                _grid_install(ctx, layer.get_submodule(name), bits)
            report.quantized_linears += len(chosen)
        elif backend.quantizes_in_torch:
            quantize_module(layer, spec, report, prefix=prefix, keep=keep)
        if not backend.quantizes_in_torch:
            layer.to(backend.weight_dtype)
        release_memory()
    if rotation is not None or calibrated:
        decoder.norm.float()
        decoder.lm_head.float()
    if rotation is not None:
        rotate_head(decoder.lm_head, decoder.norm, rotation)
    holder = nn.ModuleDict({"lm_head": decoder.lm_head})  # a parent, so the head can be swapped
    if ctx.torch_grid:
        decoder.lm_head.float()
        if ctx.tied_head:
            _round_shared_table(decoder, ctx)
        else:
            for name, bits in select_linears(holder, spec, report, "", keep).items():
                _grid_install(ctx, holder.get_submodule(name), bits)
    elif calibrated and ctx.tied_head:
        _round_shared_table(decoder, ctx)
        report.details["lm_head"] = "shares the embedding table: round-to-nearest, so the table stays shared"
    elif calibrated:
        chosen = select_linears(holder, spec, report, "", keep)
        if chosen:
            with torch.no_grad():
                normed = [decoder.norm(h) for h in hidden]
            stage = Stage("LM head", [("lm_head", decoder.lm_head)], decoder.norm, "norm")
            if spec.algo == "gptq":
                _gptq_stage(stage, normed, chosen, ctx)
            else:
                _awq_stage(stage, normed, chosen, ctx)
            report.quantized_linears += len(chosen)
            del normed
        del hidden
    elif backend.quantizes_in_torch:
        quantize_module(holder, spec, report, keep=keep)
    decoder.lm_head = holder["lm_head"]
    if ctx.awq_alphas:
        report.details["awq_mean_alpha"] = round(sum(ctx.awq_alphas) / len(ctx.awq_alphas), 3)
    if calibrated:
        report.details["calibration"] = calibration.describe()
        decoder.reset_cache()
    if spec.algo == "gptq":
        report.details["gptq"] = {"damp": GPTQ_DAMP, "act_order": GPTQ_ACT_ORDER, "true_sequential": True}


def _round_shared_table(decoder, ctx: AlgoContext) -> None:
    """Core ML with a LM head that is the embedding table: round the table to nearest on the same
    grid (GPTQ for the head would move the embedding rows too) and hand it to the converter like
    the other weights, so the package holds exactly what the verification's module holds."""
    head, embedding = decoder.lm_head, decoder.embed_tokens
    bits = linear_bits(ctx.spec, "lm_head", ctx.keep)
    if bits != ctx.spec.bits:
        ctx.report.kept_8bit.append("lm_head (shared with the embedding)")
    group = _group(ctx, head, bits)
    w = head.weight.detach().float()
    scale = ctx.round_scale(_grid_scales(ctx, w, group, bits))
    attach_coreml_quantization(head, quantize_grouped(w, scale, group, bits), scale, group, bits)
    for name, buffer in head.named_buffers(recurse=False):  # the converter may name the table either way
        embedding.register_buffer(name, buffer)


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
