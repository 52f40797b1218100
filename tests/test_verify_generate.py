"""Parity figures and their thresholds, the failure path, and greedy generation/streaming."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from mobile_export.errors import VerificationError
from mobile_export.generate import TextStreamer, generate
from mobile_export.verify import (
    DECODE_STEPS,
    FP32_THRESHOLDS,
    LOWERING_THRESHOLDS,
    QUALITY_LIMITS,
    Thresholds,
    compare,
    enforce,
    prefill_length,
    quality_check,
    stepped_logits,
    token_sequences,
)


def _logits(seed: int, rows: int = 7, vocab: int = 50) -> list[torch.Tensor]:
    return [torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 5]


def test_identical_logits_pass_every_threshold():
    ref = _logits(0)
    result = compare("same", [ref[0].clone()], ref, FP32_THRESHOLDS)
    assert result.passed and result.failures == []
    assert result.max_abs_diff == 0.0 and result.top1_agreement == 1.0
    assert result.min_cosine == pytest.approx(1.0)


def test_small_noise_is_measured_and_judged():
    ref = _logits(0)
    noisy = ref[0] + 0.05 * torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(1))
    result = compare("noisy", [noisy], ref, FP32_THRESHOLDS)
    assert not result.passed  # 0.05 noise on ~5-scale logits is far outside fp32 tolerance
    assert any("max|diff|" in f for f in result.failures)
    assert compare("noisy", [noisy], ref, LOWERING_THRESHOLDS).passed  # but cosine stays > 0.98


def test_unrelated_logits_fail_cosine_and_top1():
    result = compare("other", _logits(1), _logits(0), Thresholds(min_cosine=0.9, min_top1=0.5))
    assert not result.passed
    assert len(result.failures) == 2
    assert result.min_cosine < 0.9 and result.top1_agreement < 0.5


def test_kl_is_measured_per_position_and_bounds_lowering():
    ref = _logits(0)
    got = ref[0] + 0.6 * torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(2))
    result = compare("kl", [got], ref, LOWERING_THRESHOLDS)
    lp, lq = torch.log_softmax(ref[0].double(), -1), torch.log_softmax(got.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    assert result.kl_mean == pytest.approx(kl.mean().item(), rel=1e-9)
    assert result.kl_max == pytest.approx(kl.max().item(), rel=1e-9)
    assert compare("same", [ref[0]], ref, LOWERING_THRESHOLDS).kl_mean == pytest.approx(0.0, abs=1e-12)
    # the noise passes the cosine bound, but its KL is over the lowering bound
    assert result.mean_cosine > LOWERING_THRESHOLDS.min_mean_cosine and not result.passed
    assert [f for f in result.failures if "KL mean" in f] == result.failures


def _fidelity(ppl: float, kl: float, top1: float) -> dict:
    return {"status": "ok", "text": {"name": "t.txt"}, "tokens": 510, "perplexity_ratio": ppl, "kl_mean": kl,
            "top1_agreement": top1}  # fmt: skip


def test_quality_check_judges_the_fidelity_text():
    good = quality_check(_fidelity(1.2, 0.3, 0.8), quantized=True, meaningful=True)
    assert good.passed and good.enforced and good.failures == []
    limits = QUALITY_LIMITS
    bad = quality_check(
        _fidelity(limits.max_perplexity_ratio + 0.5, limits.max_kl_mean * 3, limits.min_top1 - 0.3),
        quantized=True,
        meaningful=True,
    )
    assert not bad.passed and len(bad.failures) == 3
    with pytest.raises(VerificationError, match="quantization cost"):
        enforce([bad], keep_anyway=False)
    random = quality_check(_fidelity(9.0, 5.0, 0.1), quantized=True, meaningful=False)
    assert not random.passed and not random.enforced
    enforce([random], keep_anyway=False)  # recorded, not enforced: random weights
    assert quality_check(_fidelity(1.0, 0.0, 1.0), quantized=False, meaningful=True) is None
    assert quality_check({"status": "skipped", "reason": "--no-eval"}, quantized=True, meaningful=True) is None


def test_enforce_raises_with_the_numbers_unless_kept():
    bad = compare("lowering parity", _logits(1), _logits(0), LOWERING_THRESHOLDS)
    with pytest.raises(VerificationError) as info:
        enforce([bad], keep_anyway=False)
    assert "lowering parity" in info.value.message and "cosine" in info.value.message
    assert info.value.exit_code != 0 and "--keep-unverified" in info.value.hint
    enforce([bad], keep_anyway=True)  # kept on request: no exception
    not_enforced = compare("cost", _logits(1), _logits(0), LOWERING_THRESHOLDS, enforced=False)
    enforce([not_enforced], keep_anyway=False)


def test_protocol_steps_prefill_then_single_tokens():
    calls = []

    def step(tokens, pos):
        calls.append((len(tokens), pos))
        return torch.full((10,), float(pos))

    seqs = token_sequences(lambda text: list(range(3, 3 + len(text.split()))), max_seq_len=64)
    out = stepped_logits(step, seqs[:1])
    n = prefill_length(seqs[0])
    assert calls[0] == (n, 0)
    assert calls[1:] == [(1, p) for p in range(n, len(seqs[0]))]
    assert out[0].shape == (1 + DECODE_STEPS, 10)


def test_generate_stops_at_eos_and_limit():
    # a fake model that always predicts (last token + 1)
    def step(tokens, pos):
        logits = torch.zeros(20)
        logits[(tokens[-1] + 1) % 20] = 1.0
        return logits

    stats = generate(step, [3, 4], max_new_tokens=10, eos_ids={8}, max_seq_len=100)
    assert stats.tokens == [5, 6, 7, 8]
    stats = generate(step, [3, 4], max_new_tokens=3, eos_ids=set(), max_seq_len=100)
    assert stats.tokens == [5, 6, 7] and stats.generated_tokens == 3
    stats = generate(step, [3, 4], max_new_tokens=10, eos_ids=set(), max_seq_len=5)
    assert len(stats.tokens) == 3  # context full


def test_streamer_holds_back_partial_utf8():
    from tokenizers import Tokenizer

    from mobile_export.sources import DEMO_TOKENIZER_DIR

    tok = Tokenizer.from_file(str(DEMO_TOKENIZER_DIR / "tokenizer.json"))
    text = "café ☕ ok"
    ids = tok.encode(text, add_special_tokens=False).ids
    streamer = TextStreamer(lambda t: tok.decode(t))
    pieces = [streamer.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_ctrl_c_during_export_leaves_nothing(tmp_path, monkeypatch):
    from mobile_export.backends.xnnpack import XnnpackBackend
    from mobile_export.cli import main

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(XnnpackBackend, "export", interrupted)
    result = CliRunner().invoke(main, ["build", "demo", "--target", "android", "-o", str(tmp_path), "-q"])
    assert result.exit_code == 130
    assert "interrupted: nothing was written" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_failing_its_own_reference_check_is_never_written(trained_model, tmp_path, monkeypatch):
    """The build runs the bundle's reference.json check (what ``verify`` and the device harnesses
    run) on the artifact in its host runtime: here the reference's log-probabilities are moved by
    half a nat, far outside the fp32 limits, so the build fails and writes nothing."""
    import mobile_export.stages as stages
    from mobile_export.cli import main

    original = stages.build_reference

    def shifted(*args, **kwargs):
        reference = original(*args, **kwargs)
        for step in reference.prompts[1].steps:
            step.top_logprobs = [value - 0.5 for value in step.top_logprobs]
        return reference

    monkeypatch.setattr(stages, "build_reference", shifted)
    out = tmp_path / "dist"
    args = ["build", "--model-path", str(trained_model), "-t", "android", "--backend", "onnx", "--quant", "fp32"]
    result = CliRunner().invoke(main, [*args, "--embedding-quant", "none", "--no-eval", "-o", str(out)])
    assert result.exit_code != 0
    assert "verification failed: reference.json check: prompt 1: max |log-prob diff| 0.5 > 0.01" in result.output
    assert not out.exists() or list(out.iterdir()) == []
