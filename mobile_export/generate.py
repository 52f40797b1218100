"""Text generation over any runtime that steps a cached decoder (greedy, or seeded sampling with
temperature and top-p); streams decoded text."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mobile_export.errors import UserError

StepFn = Callable[[list[int], int], torch.Tensor]
PickFn = Callable[[torch.Tensor], int]


def greedy(logits: torch.Tensor) -> int:
    """The most likely next token."""
    return int(torch.argmax(logits))


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (temperature 0, the default) or sampling from the
    softmax at ``temperature`` over the smallest set of tokens whose probability reaches ``top_p``.
    A ``seed`` makes sampling reproducible; without one every run differs."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature {self.temperature:g} is invalid", hint="use 0 (greedy) or a positive value")
        if not (0 < self.top_p <= 1):
            raise UserError(f"--top-p {self.top_p:g} is invalid", hint="use a value in (0, 1]")
        if self.temperature == 0 and (self.top_p != 1 or self.seed is not None):
            raise UserError("--top-p and --seed apply to sampling", hint="pass --temperature above 0 as well")

    def picker(self) -> PickFn:
        """A function from next-token logits [vocab] to a token id (one random stream per picker)."""
        if self.temperature == 0:
            return greedy
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)

        def pick(logits: torch.Tensor) -> int:
            probs = torch.softmax(logits.float().reshape(-1) / self.temperature, dim=-1)
            if self.top_p < 1:
                sorted_probs, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_probs, 0) - sorted_probs < self.top_p  # the first always stays
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            return int(torch.multinomial(probs, 1, generator=generator))

        return pick


@dataclass
class GenerationStats:
    """Timings of one generation, in the terms device-lab reports use."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    tokens: list[int] = field(default_factory=list)

    @property
    def time_to_first_token(self) -> float:
        """Seconds from the start of prefill to the first generated token."""
        return self.prefill_seconds

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second over the decode calls (the first token comes from prefill)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


class TextStreamer:
    """Turns a growing token list into new text, holding back incomplete UTF-8 pieces."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._tokens: list[int] = []
        self._emitted = 0

    def push(self, token: int) -> str:
        """Add a token; return the text that became final."""
        self._tokens.append(token)
        text = self._decode(self._tokens)
        if text.endswith("\ufffd"):  # a multi-byte character still incomplete
            return ""
        new = text[self._emitted :]
        self._emitted = len(text)
        return new


def generate(
    step: StepFn,
    prompt_tokens: list[int],
    max_new_tokens: int,
    eos_ids: set[int],
    max_seq_len: int,
    on_token: Callable[[int], None] | None = None,
    pick: PickFn = greedy,
) -> GenerationStats:
    """One prefill call, then one call per new token until a stop id (``eos_ids``: every EOS and
    end-of-turn id) or the limit; ``pick`` chooses each token (greedy by default)."""
    stats = GenerationStats(prompt_tokens=len(prompt_tokens))
    budget = min(max_new_tokens, max_seq_len - len(prompt_tokens))
    if budget <= 0:
        return stats
    start = time.perf_counter()
    logits = step(prompt_tokens, 0)
    token = pick(logits)
    stats.prefill_seconds = time.perf_counter() - start
    pos = len(prompt_tokens)
    decode_start = time.perf_counter()
    while True:
        stats.tokens.append(token)
        stats.generated_tokens += 1
        if on_token is not None:
            on_token(token)
        if token in eos_ids or stats.generated_tokens >= budget:
            break
        logits = step([token], pos)
        pos += 1
        token = pick(logits)
    stats.decode_seconds = time.perf_counter() - decode_start
    return stats
