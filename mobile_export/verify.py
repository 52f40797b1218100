"""Artifact-vs-eager parity on fixed prompts: a prefill, then teacher-forced decode steps.

Protocol: each fixed prompt is tokenized; the first ``prefill`` tokens go in one call at
position 0, then the next ``decode_steps`` tokens one at a time. Each call's last-token
logits are compared with the reference model's logits at the same positions, computed by
one full causal forward of the original transformers model (no cache), so the KV-cache path
of the artifact is checked against a cache-free reference.

Checks and thresholds (documented in README):

- ``fp32`` builds, artifact vs original: max |diff| <= 1e-3 x (1 + max |ref logit|), cosine
  >= 0.9999 at every position. A bf16 reference (models too large for an fp32 copy) uses
  5e-2 and 0.999.
- quantized builds, artifact vs the same quantized model run eagerly in PyTorch ("lowering
  parity"): mean KL(eager quantized || artifact) <= 0.05 nats and mean cosine >= 0.99 over the
  positions. The eager model computes with what the runtime stores (XNNPACK's bf16 group scales;
  before, fp32 scales put it further off), so what is left is the rounding of the dynamic int8
  activations and the kernels' summation order: measured on SmolLM2-135M (30 layers) KL 0.030,
  mean cosine 0.996 (fp32 scales: cosine min 0.954), while its 4-bit quantization cost on the
  same positions is KL 0.53; a scale-packing bug (group scales one group off) fails with KL > 0.5
  (tests/test_real_model.py); broken lowerings met while building this tool gave cosines of 0.1-0.4. The cosine catches breakage on random weights,
  whose flat logits keep any KL small. Top-1 agreement is reported, not enforced: rounding flips
  near-ties. Quantization noise itself is not part of this check.
- quantized builds, artifact vs original ("quantization cost"): on the fixed prompts only a loose
  mean KL <= 1.5 (a catch-all when ``--no-eval`` skips the fidelity text); the judgement is
  :func:`quality_check` on the fidelity text (a few hundred tokens of real text): perplexity ratio
  <= 2.0, mean KL <= 1.0, top-1 agreement >= 50%. A 4-bit 135M model meets these with room
  (SmolLM2-135M, plain round-to-nearest: x1.38, 0.51, 59% on fixed_eval.txt); a broken artifact
  cannot (tests/test_real_model.py). For random weights the figures are recorded but not
  enforced: random logits are nearly flat, so quantization noise says nothing about a trained model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from mobile_export.errors import VerificationError
from mobile_export.stepping import StepFn, teacher_forced

FIXED_PROMPTS: tuple[str, ...] = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
)
PREFILL_TOKENS = 12
DECODE_STEPS = 6



@dataclass
class Thresholds:
    """Limits one comparison must meet; None disables a check."""

    max_abs_rel: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None
    max_kl_mean: float | None = None  # mean KL(reference || artifact) over the positions
    min_mean_cosine: float | None = None


FP32_THRESHOLDS = Thresholds(max_abs_rel=1e-3, min_cosine=0.9999)
BF16_REFERENCE_THRESHOLDS = Thresholds(max_abs_rel=5e-2, min_cosine=0.999)
LOWERING_THRESHOLDS = Thresholds(max_kl_mean=0.05, min_mean_cosine=0.99)
# fp32 compute over fp16-rounded weights (the module a Core ML package was converted from)
FP16_WEIGHT_THRESHOLDS = Thresholds(max_abs_rel=1e-2, min_cosine=0.9995)
QUANT_COST_THRESHOLDS = Thresholds(max_kl_mean=1.5)


@dataclass
class Comparison:
    """Figures of one comparison and whether they met their thresholds."""

    name: str
    positions: int
    max_abs_diff: float
    max_abs_rel: float
    min_cosine: float
    mean_cosine: float
    top1_agreement: float
    kl_mean: float = 0.0
    kl_max: float = 0.0
    thresholds: dict = field(default_factory=dict)
    enforced: bool = True
    passed: bool = True
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line with the figures."""
        return (
            f"{self.name}: KL mean {self.kl_mean:.3g} max {self.kl_max:.3g}, cos min {self.min_cosine:.6f}, "
            f"top-1 {self.top1_agreement:.0%}, "
            f"max|diff| {self.max_abs_diff:.3g} ({self.max_abs_rel:.2e} rel) over {self.positions} positions"
        )


def token_sequences(encode: Callable[[str], list[int]], max_seq_len: int) -> list[list[int]]:
    """Fixed token sequences of prefill + decode length, clipped to the context."""
    total = min(PREFILL_TOKENS + DECODE_STEPS, max_seq_len)
    sequences = []
    for prompt in FIXED_PROMPTS:
        ids = list(encode(prompt))
        while len(ids) < total:  # short tokenizations repeat rather than fail
            ids = ids + ids
        sequences.append(ids[:total])
    return sequences


def prefill_length(sequence: Sequence[int]) -> int:
    """How many tokens of a fixed sequence go into the prefill call."""
    return min(PREFILL_TOKENS, max(1, len(sequence) - DECODE_STEPS))


def reference_logits(model: torch.nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Original-model logits at each compared position (prefill's last token, then each decode step)."""
    outputs = []
    with torch.no_grad():
        for seq in sequences:
            logits = model(torch.tensor([seq], dtype=torch.long)).logits[0].float()
            outputs.append(logits[prefill_length(seq) - 1 :].clone())
    return outputs


def stepped_logits(step: StepFn, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Logits from a cached model stepped like a runner: one prefill call, then one token per call."""
    return [teacher_forced(step, seq[: prefill_length(seq)], seq[prefill_length(seq) :]) for seq in sequences]


def compare(
    name: str, got: list[torch.Tensor], ref: list[torch.Tensor], thresholds: Thresholds, enforced: bool = True
) -> Comparison:
    """Compare stepped logits with reference logits position by position."""
    a = torch.cat(got).double()
    b = torch.cat(ref).double()
    diff = (a - b).abs()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    lp, lq = torch.log_softmax(b, dim=-1), torch.log_softmax(a, dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)
    max_abs = diff.max().item()
    rel = max_abs / (1.0 + b.abs().max().item())
    result = Comparison(
        name=name,
        positions=a.shape[0],
        max_abs_diff=max_abs,
        max_abs_rel=rel,
        min_cosine=cos.min().item(),
        mean_cosine=cos.mean().item(),
        top1_agreement=top1,
        kl_mean=kl.mean().item(),
        kl_max=kl.max().item(),
        thresholds={k: v for k, v in asdict(thresholds).items() if v is not None},
        enforced=enforced,
    )
    if thresholds.max_abs_rel is not None and rel > thresholds.max_abs_rel:
        result.failures.append(f"max|diff|/(1+max|ref|) {rel:.2e} > {thresholds.max_abs_rel:.0e}")
    if thresholds.min_cosine is not None and result.min_cosine < thresholds.min_cosine:
        result.failures.append(f"cosine {result.min_cosine:.6f} < {thresholds.min_cosine}")
    if thresholds.min_mean_cosine is not None and result.mean_cosine < thresholds.min_mean_cosine:
        result.failures.append(f"mean cosine {result.mean_cosine:.6f} < {thresholds.min_mean_cosine}")
    if thresholds.max_kl_mean is not None and result.kl_mean > thresholds.max_kl_mean:
        result.failures.append(f"KL mean {result.kl_mean:.3g} > {thresholds.max_kl_mean:g}")
    if thresholds.min_top1 is not None and top1 < thresholds.min_top1:
        result.failures.append(f"top-1 agreement {top1:.0%} < {thresholds.min_top1:.0%}")
    result.passed = not result.failures
    return result


def enforce(comparisons: list[Comparison], keep_anyway: bool) -> None:
    """Fail the build on an enforced comparison out of tolerance, unless told to keep it."""
    failed = [c for c in comparisons if c.enforced and not c.passed]
    if failed and not keep_anyway:
        first = failed[0]
        raise VerificationError(
            f"verification failed, {first.name}: {'; '.join(first.failures)}",
            hint="nothing was written; pass --keep-unverified to write the bundle anyway",
        )


def standard_comparisons(got: list[torch.Tensor], ctx, subject: str = "") -> list[Comparison]:
    """The comparisons every runnable artifact gets (``ctx`` is a backends.VerifyContext);
    ``subject`` names what produced ``got`` when it is not the artifact run directly.

    Quantized: lowering parity against the same quantized model run eagerly (when the
    quantization was applied in PyTorch) and quantization cost against the original. Otherwise
    parity against the original at fp32 (or bf16-reference) tolerance.
    """
    prefix = f"{subject} " if subject else ""
    if ctx.spec.is_quantized:
        comparisons = []
        if ctx.lowering_ref is not None:
            comparisons.append(
                compare(f"lowering parity ({prefix}vs eager quantized)", got, ctx.lowering_ref, LOWERING_THRESHOLDS)
            )
        comparisons.append(
            compare(
                f"quantization cost ({prefix}vs original)",
                got,
                ctx.reference,
                QUANT_COST_THRESHOLDS,
                enforced=ctx.weights_meaningful,
            )
        )
        return comparisons
    thresholds = FP32_THRESHOLDS if ctx.reference_dtype == torch.float32 else BF16_REFERENCE_THRESHOLDS
    return [compare(f"parity ({prefix}vs original)", got, ctx.reference, thresholds)]


@dataclass(frozen=True)
class QualityLimits:
    """What a quantized artifact of a trained model must reach on the fidelity text."""

    max_perplexity_ratio: float = 2.0
    max_kl_mean: float = 1.0
    min_top1: float = 0.5


QUALITY_LIMITS = QualityLimits()


@dataclass
class QualityCheck:
    """Quantization cost judged on the fidelity text (perplexity ratio, mean KL, top-1)."""

    name: str
    tokens: int
    perplexity_ratio: float
    kl_mean: float
    top1_agreement: float
    thresholds: dict = field(default_factory=dict)
    enforced: bool = True
    passed: bool = True
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line with the figures."""
        return (
            f"{self.name}: perplexity x{self.perplexity_ratio:.3f}, KL mean {self.kl_mean:.3g}, "
            f"top-1 {self.top1_agreement:.1%} over {self.tokens} tokens"
        )


def quality_check(
    fidelity: dict, quantized: bool, meaningful: bool, limits: QualityLimits = QUALITY_LIMITS
) -> QualityCheck | None:
    """The quantization-cost judgement on a build's ``fidelity`` figures (None when the build is not
    quantized or its fidelity was not measured); enforced for trained weights only."""
    if not quantized or fidelity.get("status") != "ok":
        return None
    check = QualityCheck(
        name=f"quantization cost (on {fidelity['text']['name']} vs original)",
        tokens=int(fidelity["tokens"]),
        perplexity_ratio=float(fidelity["perplexity_ratio"]),
        kl_mean=float(fidelity["kl_mean"]),
        top1_agreement=float(fidelity["top1_agreement"]),
        thresholds=asdict(limits),
        enforced=meaningful,
    )
    if check.perplexity_ratio > limits.max_perplexity_ratio:
        check.failures.append(f"perplexity x{check.perplexity_ratio:.3f} > x{limits.max_perplexity_ratio}")
    if check.kl_mean > limits.max_kl_mean:
        check.failures.append(f"KL mean {check.kl_mean:.3g} > {limits.max_kl_mean}")
    if check.top1_agreement < limits.min_top1:
        check.failures.append(f"top-1 agreement {check.top1_agreement:.0%} < {limits.min_top1:.0%}")
    check.passed = not check.failures
    return check


def judge_fidelity(backend, artifact, eval_text, outcome, spec, meaningful: bool) -> tuple[dict, QualityCheck | None]:
    """Run the artifact (or the verification's stand-in) over the eval text and judge the
    quantization cost on it; the returned figures carry ``notes`` (lines for the build output)."""
    from mobile_export.fidelity import artifact_fidelity, fidelity_in_words, fidelity_summary

    entry = {"file": artifact.name, "format": backend.artifact_format, "delegate": backend.delegate}
    fidelity = artifact_fidelity(artifact, entry, eval_text, meaningful, outcome.stand_in, outcome.stand_in_label)
    notes = [f"fidelity {fidelity_summary(fidelity)}"]
    quality = quality_check(fidelity, spec.is_quantized, meaningful)
    if quality is not None:
        status = "ok" if quality.passed else ("FAILED" if quality.enforced else "recorded, not enforced")
        notes += [f"{quality.summary()} [{status}]", f"what you get: {fidelity_in_words(fidelity)}"]
    return {**fidelity, "notes": notes}, quality
