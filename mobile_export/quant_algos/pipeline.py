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

import torch
from torch import nn

from mobile_export.memory import release_memory
from mobile_export.quant_algos.calibration import (
    Calibration,
    embed_windows,
    next_hidden,
)
from mobile_export.quant_algos.grid import (
    attach_coreml_quantization,
    quantize_grouped,
)
from mobile_export.quant_algos.layer_algos import (
    GPTQ_ACT_ORDER,
    GPTQ_DAMP,
    AlgoContext,
    Stage,
    _awq_layer,
    _awq_stage,
    _bf16_scale,
    _fp16_scale,
    _gptq_layer,
    _gptq_stage,
    _grid_install,
    _grid_scales,
    _group,
    layer_stages,
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
