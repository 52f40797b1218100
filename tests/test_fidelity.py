"""Fidelity figures and the reference.json check, without building anything (fast).

The figures are checked against independent computations (torch's own KL divergence and cross
entropy), stepping against one full forward, and the reference check against hand-made outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from doubles.lab import fake_bundle
from tiny_models import tiny_model
from transformers import DynamicCache

import mobile_export.fidelity as fidelity
from mobile_export.cli import main
from mobile_export.fidelity import (
    compare,
    eager_logits,
    eager_reference,
    evaluate_runtime,
    logits_over_text,
    window_targets,
    windows,
)
from mobile_export.reference import (
    EXACT,
    QUANTIZED,
    PromptOutput,
    ReferenceFile,
    ReferencePrompt,
    ReferenceStep,
    check_outputs,
)


def test_windows_and_targets():
    ids = list(range(10))
    assert windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert window_targets(ids, 4).tolist() == [1, 2, 3, 5, 6, 7, 9]
    assert windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a lone trailing token scores nothing


def test_compare_matches_independent_kl_and_cross_entropy(monkeypatch):
    monkeypatch.setattr(fidelity, "CHUNK_BYTES", 8 * 50 * 7)  # 7 rows per chunk: exercise chunking
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(100, 50, generator=gen) * 3
    got = ref + 0.3 * torch.randn(100, 50, generator=gen)
    targets = torch.randint(0, 50, (100,), generator=gen)
    result = compare(got, ref, targets)

    lp_ref = torch.log_softmax(ref.double(), -1)
    lp_got = torch.log_softmax(got.double(), -1)
    kl = torch.nn.functional.kl_div(lp_got, lp_ref, log_target=True, reduction="none").sum(-1)
    assert result.kl_mean == pytest.approx(kl.mean().item(), rel=1e-9)
    assert result.kl_p99 == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-9)
    ppl = math.exp(torch.nn.functional.cross_entropy(got.double(), targets).item())
    ref_ppl = math.exp(torch.nn.functional.cross_entropy(ref.double(), targets).item())
    assert result.perplexity == pytest.approx(ppl, rel=1e-9)
    assert result.perplexity_ratio == pytest.approx(ppl / ref_ppl, rel=1e-9)
    assert result.top1_agreement == (got.argmax(-1) == ref.argmax(-1)).double().mean().item()
    assert result.tokens == 100

    same = compare(ref, ref, targets)
    assert same.kl_mean == 0 and same.perplexity_ratio == 1 and same.top1_agreement == 1


class _HFStepper:
    """A transformers model stepped like a runner (KV cache, ``step(tokens, start_pos)``)."""

    def __init__(self, model):
        self.model, self.cache, self.max_seq_len = model, None, 64

    @torch.no_grad()
    def step(self, tokens, start_pos):
        if start_pos == 0:
            self.cache = DynamicCache()
        return self.model(torch.tensor([tokens]), past_key_values=self.cache, use_cache=True).logits[0, -1]


class _LogitsAll(_HFStepper):
    calls = 0

    @torch.no_grad()
    def logits_all(self, tokens, start_pos):
        type(self).calls += 1
        return self.model(torch.tensor([tokens])).logits[0]


def test_stepped_logits_equal_one_forward_per_window():
    model = tiny_model("llama")
    ids = torch.randint(0, 1024, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    eager = eager_logits(model, ids, 16)
    assert eager.shape == (15 + 15 + 7, 1024)  # windows of 16, 16, 8
    stepped = logits_over_text(_HFStepper(model), ids, 16)
    torch.testing.assert_close(stepped, eager, atol=1e-4, rtol=1e-4)
    whole = logits_over_text(_LogitsAll(model), ids, 16)
    assert _LogitsAll.calls == 3  # one call per window when the runtime has logits_all
    torch.testing.assert_close(whole, eager, atol=1e-4, rtol=1e-4)

    reference = eager_reference(model, ids, 16)
    assert reference.logprobs.dtype == torch.float16 and reference.logprobs.shape == eager.shape
    result = evaluate_runtime(_HFStepper(model), reference)
    assert result.perplexity_ratio == pytest.approx(1.0, abs=1e-5)
    assert result.reference_perplexity == pytest.approx(
        math.exp(torch.nn.functional.cross_entropy(eager.double(), window_targets(ids, 16)).item()), rel=1e-9
    )
    assert result.top1_agreement == 1.0 and result.kl_mean < 1e-5


def _reference(thresholds=EXACT, enforced=True) -> ReferenceFile:
    steps = [ReferenceStep(top_ids=[5, 6, 7], top_logprobs=[-0.5, -0.505, -3.0]) for _ in range(4)]
    prompt = ReferencePrompt(text="x", token_ids=[0, 9], greedy_tokens=[5, 5, 5, 5], steps=steps)
    return ReferenceFile(
        new_tokens=4,
        top_k=3,
        reference_dtype="float32",
        weights_meaningful=True,
        quantization="fp32",
        enforced=enforced,
        thresholds=thresholds,
        prompts=[prompt, prompt],
    )


def test_reference_check_exact_near_ties_and_gibberish():
    ref = _reference()
    good = PromptOutput(tokens=[5, 5, 5, 5], logprobs=[[-0.5, -0.505, -3.0]] * 4)
    report = check_outputs(ref, [good, good])
    assert report.passed and report.prompts[0].top1_agreement == 1.0 and report.prompts[0].max_abs_logprob_diff == 0

    near_tie = PromptOutput(tokens=[6, 5, 5, 5], logprobs=[[-0.505, -0.5, -3.0]] + [[-0.5, -0.505, -3.0]] * 3)
    report = check_outputs(ref, [near_tie, good])
    assert report.passed  # 6 is within the tie margin of 5 in the reference

    gibberish = PromptOutput(tokens=[7, 900, 3, 7], logprobs=[[-6.0, -7.0, -0.1]] * 4)
    report = check_outputs(ref, [good, gibberish])
    assert not report.passed and report.prompts[1].first_mismatch == 0
    assert report.failures[0].startswith("prompt 1: greedy agreement 0% < 95%")
    assert "max |log-prob diff| 6.5 > 0.01" in report.failures[0]  # |-7.0 - (-0.505)|

    loose = check_outputs(_reference(QUANTIZED, enforced=False), [good, gibberish])
    assert loose.passed and not loose.enforced and loose.prompts[1].failures  # recorded, not enforced


def test_eval_refuses_missing_empty_and_short_text(tmp_path):
    bundle = fake_bundle(tmp_path / "b", context_length=64)
    missing = CliRunner().invoke(main, ["eval", str(bundle), "--text", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "text file" in missing.stderr and "does not exist" in missing.stderr
    (tmp_path / "empty.txt").write_text("  \n")
    empty = CliRunner().invoke(main, ["eval", str(bundle), "--text", str(tmp_path / "empty.txt")])
    assert empty.exit_code == 2 and "is empty" in empty.stderr
    (tmp_path / "short.txt").write_text("def f(x):\n    return x\n")
    short = CliRunner().invoke(main, ["eval", str(bundle), "--text", str(tmp_path / "short.txt")])
    assert short.exit_code == 2, short.output
    assert "fewer than one window of 64" in short.stderr and "smaller --window" in short.stderr


def test_eval_refuses_bad_bundle_and_window(tmp_path):
    (tmp_path / "t.txt").write_text("word " * 400)
    missing = CliRunner().invoke(main, ["eval", str(tmp_path / "nope"), "--text", str(tmp_path / "t.txt")])
    assert missing.exit_code == 2 and "does not exist or is not a folder" in missing.stderr
    bundle = fake_bundle(tmp_path / "b", context_length=64)
    wide = CliRunner().invoke(main, ["eval", str(bundle), "--text", str(tmp_path / "t.txt"), "--window", "128"])
    assert wide.exit_code == 2 and "--window 128 exceeds the context" in wide.stderr


@pytest.mark.skipif(__import__("platform").system() == "Darwin", reason="Core ML runs on macOS")
def test_eval_core_ml_bundle_off_macos_is_refused_with_the_reason(tmp_path):
    (tmp_path / "t.txt").write_text("word " * 400)
    bundle = fake_bundle(
        tmp_path / "ios",
        backend="coreml",
        target="ios",
        context_length=64,
        artifact={"file": "model.pte", "format": "coreml-mlpackage"},
    )
    result = CliRunner().invoke(main, ["eval", str(bundle), "--text", str(tmp_path / "t.txt")])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no bundle could run here") and "Core ML packages run only on macOS" in line


def test_verify_without_reference_json(tmp_path):
    bundle = fake_bundle(tmp_path / "b")
    result = CliRunner().invoke(main, ["verify", str(bundle)])
    assert result.exit_code == 2 and "has no reference.json" in result.stderr


def test_build_refuses_a_missing_eval_text_before_loading(tmp_path):
    result = CliRunner().invoke(
        main, ["build", "demo", "--target", "android", "-o", str(tmp_path), "--eval-text", str(tmp_path / "no.txt")]
    )
    assert result.exit_code == 2, result.output
    assert "eval text file" in result.stderr and "does not exist" in result.stderr
    assert "Load demo" not in result.output
