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
  parity"): cosine >= 0.98 at every position. XNNPACK's and torchao's dynamic activation
  rounding differ slightly and the difference grows through the layers (measured 0.9988-0.9999
  on the 2-layer test models and 0.986 on a 32-layer Phi-3-mini shape with random weights; the
  broken lowerings met while building this tool measured 0.12-0.40).
  Top-1 agreement is reported, not enforced: rounding flips near-ties. This proves export and
  lowering kept the numbers; quantization noise itself is not part of it.
- quantized builds, artifact vs original ("quantization cost"): cosine >= 0.95 and top-1
  agreement >= 60% for real weights. For random weights the figures are recorded but not
  enforced: random logits are nearly flat, so quantization noise says nothing about a trained
  model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from mobile_export.errors import VerificationError

FIXED_PROMPTS: tuple[str, ...] = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
)
PREFILL_TOKENS = 12
DECODE_STEPS = 6

StepFn = Callable[[list[int], int], torch.Tensor]


@dataclass
class Thresholds:
    """Limits one comparison must meet; None disables a check."""

    max_abs_rel: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None


FP32_THRESHOLDS = Thresholds(max_abs_rel=1e-3, min_cosine=0.9999)
BF16_REFERENCE_THRESHOLDS = Thresholds(max_abs_rel=5e-2, min_cosine=0.999)
LOWERING_THRESHOLDS = Thresholds(min_cosine=0.98)
# fp32 compute over fp16-rounded weights (the module a Core ML package was converted from)
FP16_WEIGHT_THRESHOLDS = Thresholds(max_abs_rel=1e-2, min_cosine=0.9995)
QUANT_COST_THRESHOLDS = Thresholds(min_cosine=0.95, min_top1=0.6)


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
    thresholds: dict = field(default_factory=dict)
    enforced: bool = True
    passed: bool = True
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line with the figures."""
        return (
            f"{self.name}: cos min {self.min_cosine:.6f}, top-1 {self.top1_agreement:.0%}, "
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
    outputs = []
    for seq in sequences:
        n = prefill_length(seq)
        rows = [step(list(seq[:n]), 0)]
        for pos in range(n, len(seq)):
            rows.append(step([seq[pos]], pos))
        outputs.append(torch.stack([r.reshape(-1).float() for r in rows]))
    return outputs


def compare(
    name: str, got: list[torch.Tensor], ref: list[torch.Tensor], thresholds: Thresholds, enforced: bool = True
) -> Comparison:
    """Compare stepped logits with reference logits position by position."""
    a = torch.cat(got).double()
    b = torch.cat(ref).double()
    diff = (a - b).abs()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
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
        thresholds={k: v for k, v in asdict(thresholds).items() if v is not None},
        enforced=enforced,
    )
    if thresholds.max_abs_rel is not None and rel > thresholds.max_abs_rel:
        result.failures.append(f"max|diff|/(1+max|ref|) {rel:.2e} > {thresholds.max_abs_rel:.0e}")
    if thresholds.min_cosine is not None and result.min_cosine < thresholds.min_cosine:
        result.failures.append(f"cosine {result.min_cosine:.6f} < {thresholds.min_cosine}")
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
    """The comparisons every runnable artifact gets (``ctx`` is a targets.VerifyContext);
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
