"""Fidelity of an artifact to its original model on text: perplexity, KL divergence, top-1.

The figures llama.cpp's ``llama-perplexity --kl-divergence`` reports, computed on the artifact
in its own runtime. Protocol: the text's tokens are cut into non-overlapping windows of
``window`` tokens; each window is fed from position 0 (a fresh cache), and the logits at every
position but the last predict the next token of the window (so a window of W tokens scores W-1
targets; a trailing window of one token is dropped). The artifact is fed like a runner: the
window's first token as a prefill at position 0, then one token per call; a runtime with
``logits_all(tokens, start_pos) -> [T, vocab]`` (every :class:`~mobile_export.runtimes.Runtime`)
gets the whole window at once (ONNX Runtime in one call; the base class steps token by token).

Per scored position, with ``p`` the reference (original model, fp32) distribution and ``q`` the
artifact's: perplexity is ``exp(mean -log q(target))``; KL is ``KL(p || q) = sum p (log p - log q)``;
top-1 agreement is ``argmax p == argmax q``. Everything is computed in float64, a bounded number
of rows at a time, so large vocabularies do not hold several [N, vocab] copies.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mobile_export.errors import UserError
from mobile_export.stepping import teacher_forced

StepFn = Callable[[list[int], int], torch.Tensor]

FIXED_EVAL_TEXT = Path(__file__).resolve().parent / "assets" / "text" / "fixed_eval.txt"
DEFAULT_WINDOW = 256
# float64 bytes of one compare chunk ([rows, vocab] per tensor); bounds memory for 128k vocabularies
CHUNK_BYTES = 64 * 2**20


@dataclass
class FidelityResult:
    """Fidelity figures of one artifact against its reference on one text."""

    perplexity: float
    reference_perplexity: float
    perplexity_ratio: float
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    tokens: int
    seconds: float = 0.0

    def to_dict(self, digits: int = 6) -> dict:
        """The figures as a JSON-ready dict (floats rounded to ``digits`` significant digits)."""
        return {k: float(f"{v:.{digits}g}") if isinstance(v, float) else v for k, v in asdict(self).items()}


def windows(token_ids: Sequence[int], window: int) -> list[list[int]]:
    """Non-overlapping windows of ``window`` tokens; a trailing window of one token is dropped."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, not {window}")
    chunks = [list(token_ids[i : i + window]) for i in range(0, len(token_ids), window)]
    return [c for c in chunks if len(c) >= 2]


def window_targets(token_ids: Sequence[int], window: int) -> torch.Tensor:
    """The scored next tokens, in the order the logits functions return their rows [N]."""
    return torch.tensor([t for chunk in windows(token_ids, window) for t in chunk[1:]], dtype=torch.long)


def _step_fn(step_or_runtime) -> tuple[StepFn | None, Callable | None]:
    if hasattr(step_or_runtime, "logits_all"):
        return None, step_or_runtime.logits_all
    if hasattr(step_or_runtime, "step"):
        return step_or_runtime.step, None
    return step_or_runtime, None


def iter_window_logits(step_or_runtime, token_ids: Sequence[int], window: int) -> Iterator[torch.Tensor]:
    """Per window, the runtime's next-token logits at every position but the last [W-1, vocab] (fp32).

    ``step_or_runtime`` is a ``step(tokens, start_pos)`` function or an object with ``step``
    (and optionally ``logits_all``); each window starts at position 0 again.
    """
    step, logits_all = _step_fn(step_or_runtime)
    for chunk in windows(token_ids, window):
        inputs = chunk[:-1]
        if logits_all is not None:
            yield logits_all(inputs, 0).reshape(len(inputs), -1).float()
            continue
        yield teacher_forced(step, inputs[:1], inputs[1:])


def logits_over_text(step_or_runtime, token_ids: Sequence[int], window: int) -> torch.Tensor:
    """Next-token logits of a stepped runtime for every scored position of the text [N, vocab]."""
    return torch.cat(list(iter_window_logits(step_or_runtime, token_ids, window)))


@torch.no_grad()
def iter_eager_logits(hf_model: torch.nn.Module, token_ids: Sequence[int], window: int) -> Iterator[torch.Tensor]:
    """Per window, one full causal forward of a transformers model: logits [W-1, vocab] (fp32)."""
    for chunk in windows(token_ids, window):
        ids = torch.tensor([chunk[:-1]], dtype=torch.long)
        yield hf_model(ids, use_cache=False).logits[0].float()


def eager_logits(hf_model: torch.nn.Module, token_ids: Sequence[int], window: int) -> torch.Tensor:
    """Next-token logits of the original model for every scored position of the text [N, vocab]."""
    return torch.cat(list(iter_eager_logits(hf_model, token_ids, window)))


@dataclass
class Reference:
    """The original model's next-token distributions on a text, kept compactly.

    ``logprobs`` are fp16 log-probabilities [N, vocab] (half the bytes of fp32 logits; KL comes
    from them); ``target_logprobs`` the exact float64 log-probability of each scored token [N]
    (the reference perplexity) and ``top1`` the exact argmax [N] (fp16 rounding creates ties).
    """

    token_ids: list[int]
    window: int
    targets: torch.Tensor
    logprobs: torch.Tensor
    target_logprobs: torch.Tensor
    top1: torch.Tensor

    @property
    def perplexity(self) -> float:
        """The original model's perplexity on the text."""
        return math.exp(-self.target_logprobs.mean().item())


def eager_reference(hf_model: torch.nn.Module, token_ids: Sequence[int], window: int) -> Reference:
    """The original model's :class:`Reference` on ``token_ids`` (one forward per window)."""
    targets = window_targets(token_ids, window)
    logprobs, target_lp, top1, row = [], [], [], 0
    for logits in iter_eager_logits(hf_model, token_ids, window):
        rows = max(1, CHUNK_BYTES // (8 * logits.shape[-1]))
        for start in range(0, len(logits), rows):  # float64 a bounded number of rows at a time
            lp = torch.log_softmax(logits[start : start + rows].double(), dim=-1)
            target_lp.append(lp.gather(-1, targets[row : row + len(lp), None])[:, 0])
            top1.append(lp.argmax(-1))
            logprobs.append(lp.to(torch.float16))
            row += len(lp)
            del lp
        del logits
    return Reference(
        token_ids=list(token_ids),
        window=window,
        targets=targets,
        logprobs=torch.cat(logprobs),
        target_logprobs=torch.cat(target_lp),
        top1=torch.cat(top1),
    )


@dataclass
class FidelityAccumulator:
    """Adds up fidelity figures chunk by chunk (float64), so logits never need to be held whole."""

    nll: float = 0.0
    ref_nll: float = 0.0
    top1: int = 0
    kl: list[torch.Tensor] = field(default_factory=list)

    def add(
        self,
        logits: torch.Tensor,
        ref_logits: torch.Tensor,
        targets: torch.Tensor,
        ref_target_logprobs: torch.Tensor | None = None,
        ref_top1: torch.Tensor | None = None,
    ) -> None:
        """Add rows: artifact logits [n, V], reference logits or log-probs [n, V], targets [n];
        optionally the reference's exact target log-probs and argmax [n], used instead of those
        of ``ref_logits`` (when it is a rounded copy)."""
        if logits.shape != ref_logits.shape or logits.shape[0] != targets.shape[0]:
            raise ValueError(f"shapes differ: {tuple(logits.shape)}, {tuple(ref_logits.shape)}, {tuple(targets.shape)}")
        rows = max(1, CHUNK_BYTES // (8 * max(1, logits.shape[-1])))
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            lq = torch.log_softmax(logits[start:end].double(), dim=-1)
            lp = torch.log_softmax(ref_logits[start:end].double(), dim=-1)
            tgt = targets[start:end, None]
            self.nll -= lq.gather(-1, tgt).sum().item()
            if ref_target_logprobs is None:
                self.ref_nll -= lp.gather(-1, tgt).sum().item()
            else:
                self.ref_nll -= ref_target_logprobs[start:end].double().sum().item()
            best = lp.argmax(-1) if ref_top1 is None else ref_top1[start:end]
            self.top1 += int((lq.argmax(-1) == best).sum())
            # KL(p || q); exp(lp) underflows to 0 where p is negligible, so no 0 * inf arises
            kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)
            self.kl.append(kl)
            del lq, lp

    @property
    def tokens(self) -> int:
        """Scored positions so far."""
        return sum(len(k) for k in self.kl)

    def result(self, seconds: float = 0.0) -> FidelityResult:
        """The figures over everything added."""
        n = self.tokens
        if n == 0:
            raise ValueError("no positions were compared")
        kl = torch.cat(self.kl)
        ppl = math.exp(self.nll / n)
        ref_ppl = math.exp(self.ref_nll / n)
        return FidelityResult(
            perplexity=ppl,
            reference_perplexity=ref_ppl,
            perplexity_ratio=ppl / ref_ppl,
            kl_mean=kl.mean().item(),
            kl_p99=torch.quantile(kl, 0.99).item(),
            kl_max=kl.max().item(),
            top1_agreement=self.top1 / n,
            tokens=n,
            seconds=seconds,
        )


def compare(
    logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor, seconds: float = 0.0
) -> FidelityResult:
    """Fidelity of ``logits`` [N, vocab] to ``ref_logits`` [N, vocab] (logits or log-probs) for
    next tokens ``targets`` [N]."""
    acc = FidelityAccumulator()
    acc.add(logits, ref_logits, targets)
    return acc.result(seconds)


def evaluate_runtime(step_or_runtime, reference: Reference) -> FidelityResult:
    """Run the artifact over the reference's text, window by window, and compare as it goes
    (only one window of artifact logits is held at a time)."""
    start = time.perf_counter()
    acc = accumulate_windows(iter_window_logits(step_or_runtime, reference.token_ids, reference.window), reference)
    return acc.result(time.perf_counter() - start)


def accumulate_windows(window_logits, reference: Reference) -> FidelityAccumulator:
    """Compare each window's logits (in text order) with the reference's rows, one window at a time."""
    acc = FidelityAccumulator()
    row = 0
    for logits in window_logits:
        end = row + logits.shape[0]
        acc.add(
            logits,
            reference.logprobs[row:end],
            reference.targets[row:end],
            reference.target_logprobs[row:end],
            reference.top1[row:end],
        )
        row = end
    return acc


def text_tokens(encode: Callable[[str], list[int]], text: str, max_tokens: int) -> list[int]:
    """The text's first ``max_tokens`` token ids (as the tokenizer encodes it, BOS included)."""
    return list(encode(text))[:max_tokens]


def text_sha256(text: str) -> str:
    """sha256 of the text's UTF-8 bytes (names the eval text in manifests)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- fidelity of a build's artifact (recorded in manifest.json) -----------------------------------

BUILD_EVAL_TOKENS = 512
MIN_EVAL_TOKENS = 16


def read_text(path: Path, what: str = "text") -> str:
    """A UTF-8 text file's contents; one-line errors for missing, unreadable or empty files."""
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist", hint="pass a UTF-8 plain-text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} file {path}: {exc}", hint="pass a UTF-8 plain-text file") from exc
    if not text.strip():
        raise UserError(f"{what} file {path} is empty", hint="pass a file with a few thousand words")
    return text


@dataclass
class EvalText:
    """The text a build evaluates its artifact on, tokenized, with its eager reference."""

    name: str
    sha256: str
    reference: Reference
    reference_dtype: str

    def describe(self) -> dict:
        """The text's identity for the manifest."""
        return {"name": self.name, "sha256": self.sha256, "tokens": len(self.reference.token_ids)}


def build_eval_reference(
    model: torch.nn.Module,
    encode: Callable[[str], list[int]],
    text_path: Path | None,
    max_seq_len: int,
    max_tokens: int = BUILD_EVAL_TOKENS,
) -> EvalText:
    """Eager reference of the original model on the build's eval text (``fixed_eval.txt`` unless
    ``--eval-text``), at most ``max_tokens`` tokens in windows of min(context, 256)."""
    path = text_path or FIXED_EVAL_TEXT
    text = read_text(path, "eval text")
    vocab = int(model.config.vocab_size)
    ids = [min(int(t), vocab - 1) for t in text_tokens(encode, text, max_tokens)]
    if len(ids) < MIN_EVAL_TOKENS:
        raise UserError(
            f"eval text {path} has only {len(ids)} tokens", hint=f"use a text of at least {MIN_EVAL_TOKENS} tokens"
        )
    window = min(max_seq_len, DEFAULT_WINDOW)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return EvalText(
        name=path.name, sha256=text_sha256(text), reference=eager_reference(model, ids, window), reference_dtype=dtype
    )


def artifact_fidelity(
    path: Path, artifact: dict, eval_text: EvalText, meaningful: bool, stand_in=None, stand_in_label: str = ""
) -> dict:
    """Run the written artifact (at ``path``; ``artifact`` is its manifest entry) in its runtime
    over the eval text: the manifest's ``fidelity``.

    When the artifact cannot run on this machine, ``stand_in`` (a stepping object the backend's
    verification vouched for, e.g. a Core ML package's weights in PyTorch) runs instead and
    ``runtime`` says so; without one, ``status`` is ``skipped`` with the reason."""
    from mobile_export.memory import release_memory
    from mobile_export.runtimes import open_artifact

    facts = {
        "text": eval_text.describe(),
        "window": eval_text.reference.window,
        "reference": f"original model, eager {eval_text.reference_dtype}",
        "meaningful": meaningful,
    }
    try:
        runtime = open_artifact(path, artifact)
    except UserError as exc:
        if stand_in is None:
            return {"status": "skipped", "reason": exc.message, **facts}
        runtime, facts["runtime"] = stand_in, f"{stand_in_label} ({exc.message})"
    result = evaluate_runtime(runtime, eval_text.reference)
    del runtime
    release_memory()
    return {"status": "ok", **facts, **result.to_dict()}


def fidelity_summary(fidelity: dict) -> str:
    """One line for the build output."""
    if fidelity.get("status") != "ok":
        return f"skipped ({fidelity.get('reason')})"
    note = "" if fidelity["meaningful"] else " [random weights: not meaningful]"
    if fidelity.get("runtime"):
        note += f" [ran on {fidelity['runtime'].split(' (')[0]}]"
    return (
        f"on {fidelity['text']['name']} ({fidelity['tokens']} tokens): perplexity "
        f"{fidelity['perplexity']:.4g} vs {fidelity['reference_perplexity']:.4g} eager "
        f"(x{fidelity['perplexity_ratio']:.4f}), KL mean {fidelity['kl_mean']:.3g} p99 {fidelity['kl_p99']:.3g}, "
        f"top-1 {fidelity['top1_agreement']:.1%}{note}"
    )


def fidelity_in_words(fidelity: dict) -> str | None:
    """What the user gets, in words: "perplexity +12% vs the original, top-1 agreement 81%, ..."."""
    if fidelity.get("status") != "ok":
        return None
    change = (fidelity["perplexity_ratio"] - 1) * 100
    return (
        f"perplexity {change:+.0f}% vs the original; the same next token as the original "
        f"{fidelity['top1_agreement']:.0%} of the time; KL {fidelity['kl_mean']:.2f} nats per token "
        f"(on {fidelity['tokens']} tokens of {fidelity['text']['name']})"
    )
