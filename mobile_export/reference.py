"""``reference.json``: what the original model does on fixed prompts, so any runtime can check itself.

Written into every bundle from the original model before conversion: for each of
:data:`~mobile_export.verify.FIXED_PROMPTS`, its token ids, the eager model's greedy
continuation (``new_tokens`` tokens; EOS does not stop it) and, at each step, the top-k token ids
with their log-probabilities. A few KB, not logits.

Check protocol (teacher-forced, so one early near-tie cannot derail the rest): per prompt, prefill
the prompt at position 0, then feed the reference's greedy tokens one at a time. At step ``i``
(the distribution that predicts ``greedy_tokens[i]``) the runtime reports its own argmax and its
log-probabilities of the step's ``top_ids``. Agreement counts a step as agreeing when the argmax
is the reference's token, or a near-tie: another of the reference's top-k whose reference
log-probability is within ``tie_margin`` of the best. Limits by quantization are written
into the file (``thresholds``) so phones apply the same ones; ``enforced`` is false where the
figures say nothing (quantized random weights).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, ValidationError

from mobile_export.errors import UserError, describe_validation_error
from mobile_export.stepping import teacher_forced
from mobile_export.verify import FIXED_PROMPTS

REFERENCE_NAME = "reference.json"
REFERENCE_SCHEMA = "mobile-export.reference"
REFERENCE_SCHEMA_VERSION = 1
NEW_TOKENS = 16
TOP_K = 5
PROTOCOL = (
    "teacher-forced: prefill token_ids at position 0, then feed greedy_tokens one at a time; "
    "steps[i] is the distribution that predicts greedy_tokens[i]"
)


class ReferenceLimits(BaseModel):
    """Limits a runtime's outputs must meet against the reference."""

    min_top1_agreement: float
    max_abs_logprob_diff: float | None = None
    max_mean_abs_logprob_diff: float | None = None
    tie_margin: float = 0.0


# fp32 artifacts agree with eager to ~1e-5 in log-probability (measured); fp16 compute or a bf16
# reference to ~1e-2. Quantized limits come from the real SmolLM2-135M-Instruct (the trained tiny
# test model moves far less: 0.06-0.11 nat): healthy 4-bit builds move the reference's top-5
# log-probabilities by 0.59-1.49 nat on average per prompt (8da4w g32 hqq, g128, the xnnpack and
# onnx defaults) and agree on 69-94% of greedy steps; one group-off scale in every down_proj
# moves them by 10.6-14.3 nat and agrees on none. The limits sit about 2x from the healthy
# figures and 3x from the broken ones.
EXACT = ReferenceLimits(min_top1_agreement=0.95, max_abs_logprob_diff=0.01, max_mean_abs_logprob_diff=0.002, tie_margin=0.01)
HALF = ReferenceLimits(min_top1_agreement=0.9, max_abs_logprob_diff=0.25, max_mean_abs_logprob_diff=0.05, tie_margin=0.1)
QUANTIZED = ReferenceLimits(min_top1_agreement=0.4, max_mean_abs_logprob_diff=3.0, tie_margin=0.25)


class ReferenceStep(BaseModel):
    """One teacher-forced step: the reference's top-k ids (best first) and their log-probabilities."""

    top_ids: list[int]
    top_logprobs: list[float]


class ReferencePrompt(BaseModel):
    """One fixed prompt and the original model's greedy continuation."""

    text: str
    token_ids: list[int]
    greedy_tokens: list[int]
    steps: list[ReferenceStep]


class ReferenceFile(BaseModel):
    """The contents of ``reference.json``."""

    schema_name: Literal["mobile-export.reference"] = Field(default=REFERENCE_SCHEMA, alias="schema")
    schema_version: int = REFERENCE_SCHEMA_VERSION
    protocol: str = PROTOCOL
    new_tokens: int
    top_k: int
    reference_dtype: str
    weights_meaningful: bool
    quantization: str
    enforced: bool
    thresholds: ReferenceLimits
    prompts: list[ReferencePrompt]

    model_config = {"populate_by_name": True}


def thresholds_for(scheme: str, quantized: bool, reference_dtype: str) -> ReferenceLimits:
    """The check's thresholds: for any weight below 16 bits (embeddings included), else by the
    linear scheme and the reference's dtype."""
    if quantized:
        return QUANTIZED
    if scheme == "fp32" and reference_dtype == "float32":
        return EXACT
    return HALF


@torch.no_grad()
def build_reference(
    model: torch.nn.Module,
    encode: Callable[[str], list[int]],
    *,
    max_seq_len: int,
    spec,
    weights_meaningful: bool,
    new_tokens: int = NEW_TOKENS,
    top_k: int = TOP_K,
) -> ReferenceFile:
    """Greedy continuations and top-k log-probabilities of the original (eager) model.

    ``spec`` (a :class:`~mobile_export.quantize.QuantSpec`) picks the thresholds: its linear
    scheme, and whether any weight (embeddings included) is stored below 16 bits.
    """
    vocab = int(model.config.vocab_size)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    prompts = []
    for text in FIXED_PROMPTS:
        ids = [min(int(t), vocab - 1) for t in encode(text)][: max(1, max_seq_len - new_tokens)]
        out = model(torch.tensor([ids]), use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        greedy, steps = [], []
        for index in range(new_tokens):
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            top = torch.topk(logprobs, min(top_k, vocab))
            token = int(top.indices[0])
            greedy.append(token)
            steps.append(
                ReferenceStep(top_ids=top.indices.tolist(), top_logprobs=[round(v, 5) for v in top.values.tolist()])
            )
            if index + 1 < new_tokens:
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[0, -1]
        prompts.append(ReferencePrompt(text=text, token_ids=ids, greedy_tokens=greedy, steps=steps))
    return ReferenceFile(
        new_tokens=new_tokens,
        top_k=top_k,
        reference_dtype=dtype,
        weights_meaningful=weights_meaningful,
        quantization=spec.label,
        enforced=weights_meaningful or not spec.is_quantized,
        thresholds=thresholds_for(spec.scheme, spec.is_quantized, dtype),
        prompts=prompts,
    )


def write_reference(folder: Path, reference: ReferenceFile) -> Path:
    """Write ``reference.json`` (compact JSON) into ``folder`` via a temporary file."""
    path = folder / REFERENCE_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{REFERENCE_NAME}.tmp-", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(reference.model_dump_json(by_alias=True) + "\n")
    os.replace(tmp, path)
    return path


def read_reference(bundle: Path, vocab_size: int | None = None, context_length: int | None = None) -> ReferenceFile:
    """Load and validate a bundle's ``reference.json``; one-line errors for missing or broken files.

    With the bundle's ``vocab_size`` and ``context_length`` every token id and every sequence is
    checked against them too, so nothing out of range ever reaches a native runtime."""
    path = bundle / REFERENCE_NAME
    if not path.is_file():
        raise UserError(f"{bundle} has no {REFERENCE_NAME}", hint="rebuild the bundle with this mobile-export")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}", hint="rebuild the bundle") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > REFERENCE_SCHEMA_VERSION:
        raise UserError(
            f"{path} uses reference schema {version}; this mobile-export reads up to {REFERENCE_SCHEMA_VERSION}",
            hint="upgrade mobile-export",
        )
    try:
        reference = ReferenceFile.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}", hint="rebuild the bundle") from exc
    problem = reference_problem(reference, vocab_size, context_length)
    if problem:
        raise UserError(f"{path}: {problem}", hint="rebuild the bundle")
    return reference


def reference_problem(reference: ReferenceFile, vocab_size: int | None, context_length: int | None) -> str | None:
    """The first inconsistency of a parsed reference (lengths, token ids out of the vocabulary,
    sequences longer than the context, non-finite figures); None when it can be run as is."""
    if not reference.prompts:
        return "no prompts"
    limits = reference.thresholds
    for name in ("min_top1_agreement", "max_abs_logprob_diff", "max_mean_abs_logprob_diff", "tie_margin"):
        value = getattr(limits, name)
        if value is not None and not math.isfinite(value):
            return f"key 'thresholds.{name}': {value} is not a finite number"
    for index, prompt in enumerate(reference.prompts):
        where = f"prompt {index}"
        if not prompt.token_ids:
            return f"{where} has no token_ids"
        if len(prompt.steps) != len(prompt.greedy_tokens):
            return f"{where} has {len(prompt.steps)} steps for {len(prompt.greedy_tokens)} greedy tokens"
        if context_length is not None and len(prompt.token_ids) + len(prompt.greedy_tokens) > context_length:
            return (
                f"{where} needs {len(prompt.token_ids) + len(prompt.greedy_tokens)} positions; "
                f"the bundle's context is {context_length}"
            )
        for step_index, step in enumerate(prompt.steps):
            if not step.top_ids or len(step.top_ids) != len(step.top_logprobs):
                return (
                    f"{where} step {step_index}: {len(step.top_ids)} top_ids for {len(step.top_logprobs)} top_logprobs"
                )
            if not all(math.isfinite(v) for v in step.top_logprobs):
                return f"{where} step {step_index}: top_logprobs are not all finite numbers"
        ids = [
            *prompt.token_ids,
            *prompt.greedy_tokens,
            *(t for step in prompt.steps for t in step.top_ids),
        ]
        bad = next((t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)), None)
        if bad is not None:
            limit = f"0..{vocab_size - 1}" if vocab_size is not None else "0 or more"
            return f"{where}: token id {bad} is outside the vocabulary ({limit})"
    return None


@dataclass
class PromptOutput:
    """What a runtime produced for one reference prompt: its argmax at each teacher-forced step
    and (optionally) its log-probabilities of that step's reference top-k ids."""

    tokens: list[int]
    logprobs: list[list[float]] | None = None


def run_reference(step_or_runtime, reference: ReferenceFile) -> list[PromptOutput]:
    """Run the reference protocol with a stepped runtime (``step(tokens, start_pos)``)."""
    step = step_or_runtime.step if hasattr(step_or_runtime, "step") else step_or_runtime
    outputs = []
    for prompt in reference.prompts:
        if not prompt.steps:
            outputs.append(PromptOutput(tokens=[], logprobs=[]))
            continue
        rows = teacher_forced(step, prompt.token_ids, prompt.greedy_tokens[: len(prompt.steps) - 1])
        tokens, logprobs = [], []
        for row, ref_step in zip(rows, prompt.steps, strict=True):
            lp = torch.log_softmax(row.double(), dim=-1)
            tokens.append(int(lp.argmax()))
            logprobs.append([round(float(lp[i]), 5) for i in ref_step.top_ids])
        outputs.append(PromptOutput(tokens=tokens, logprobs=logprobs))
    return outputs


@dataclass
class PromptParity:
    """Figures of one prompt."""

    prompt: int
    steps: int
    top1_agreement: float
    first_mismatch: int | None
    max_abs_logprob_diff: float | None
    mean_abs_logprob_diff: float | None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ParityReport:
    """The check of a runtime's outputs against ``reference.json``."""

    prompts: list[PromptParity]
    thresholds: dict
    enforced: bool

    @property
    def passed(self) -> bool:
        """True when every prompt met the thresholds (always true when not enforced)."""
        return not self.enforced or all(p.passed for p in self.prompts)

    @property
    def failures(self) -> list[str]:
        """One line per failing prompt."""
        return [f"prompt {p.prompt}: {'; '.join(p.failures)}" for p in self.prompts if p.failures]

    def to_dict(self) -> dict:
        """JSON-ready form (results files, manifests)."""
        return {
            "passed": self.passed,
            "enforced": self.enforced,
            "thresholds": self.thresholds,
            "prompts": [{**asdict(p), "passed": p.passed} for p in self.prompts],
        }


def check_outputs(reference: ReferenceFile, outputs: list[PromptOutput]) -> ParityReport:
    """Compare a runtime's outputs (from :func:`run_reference`, or a device harness) with the reference."""
    limits = reference.thresholds
    if len(outputs) != len(reference.prompts):
        raise UserError(f"{len(outputs)} prompt outputs for {len(reference.prompts)} reference prompts")
    rows = []
    for index, (prompt, out) in enumerate(zip(reference.prompts, outputs, strict=True)):
        steps = len(prompt.steps)
        if len(out.tokens) != steps:
            rows.append(
                PromptParity(index, steps, 0.0, 0, None, None, [f"{len(out.tokens)} tokens reported for {steps} steps"])
            )
            continue
        agree, first_mismatch = 0, None
        for i, (ref_step, token) in enumerate(zip(prompt.steps, out.tokens, strict=True)):
            if token == prompt.greedy_tokens[i]:
                agree += 1
                continue
            if token in ref_step.top_ids:
                gap = ref_step.top_logprobs[0] - ref_step.top_logprobs[ref_step.top_ids.index(token)]
                if gap <= limits.tie_margin:
                    agree += 1
                    continue
            first_mismatch = i if first_mismatch is None else first_mismatch
        max_diff = mean_diff = None
        if out.logprobs is not None:
            diffs = [
                abs(got - want)
                for ref_step, row in zip(prompt.steps, out.logprobs, strict=True)
                for got, want in zip(row, ref_step.top_logprobs, strict=True)
            ]
            max_diff, mean_diff = max(diffs), sum(diffs) / len(diffs)
        row = PromptParity(index, steps, agree / steps, first_mismatch, max_diff, mean_diff)
        if row.top1_agreement < limits.min_top1_agreement:
            row.failures.append(f"greedy agreement {row.top1_agreement:.0%} < {limits.min_top1_agreement:.0%}")
        if max_diff is not None and limits.max_abs_logprob_diff is not None and max_diff > limits.max_abs_logprob_diff:
            row.failures.append(f"max |log-prob diff| {max_diff:.3g} > {limits.max_abs_logprob_diff:g}")
        if (
            mean_diff is not None
            and limits.max_mean_abs_logprob_diff is not None
            and mean_diff > limits.max_mean_abs_logprob_diff
        ):
            row.failures.append(f"mean |log-prob diff| {mean_diff:.3g} > {limits.max_mean_abs_logprob_diff:g}")
        rows.append(row)
    return ParityReport(prompts=rows, thresholds=limits.model_dump(exclude_none=True), enforced=reference.enforced)


def verify_bundle(bundle: Path) -> tuple[ParityReport, dict]:
    """Run a bundle's artifact here against its ``reference.json``; returns the report and the
    manifest facts to print (raises ``UserError`` when the artifact cannot run here)."""
    from mobile_export.bundle import read_checked_manifest as checked_manifest

    manifest = checked_manifest(bundle)
    reference = read_reference(bundle, manifest.vocab_size(), manifest.context_length)
    report = check_artifact(Path(bundle) / manifest.artifact["file"], manifest.artifact, reference)
    facts = {
        "backend": manifest.backend,
        "quantization": manifest.quantization.get("scheme"),
        "weights": manifest.model.weights,
    }
    return report, facts


def check_artifact(path: Path, artifact: dict, reference: ReferenceFile) -> ParityReport:
    """Run the artifact at ``path`` (``artifact``: its manifest entry) in its host runtime against
    ``reference``: what ``mobile-export verify`` runs, and the build before it writes a bundle.
    Raises ``UserError`` when the artifact cannot run here."""
    from mobile_export.memory import release_memory
    from mobile_export.runtimes import open_artifact

    runtime = open_artifact(path, artifact)
    try:
        return check_outputs(reference, run_reference(runtime, reference))
    finally:
        del runtime
        release_memory()
