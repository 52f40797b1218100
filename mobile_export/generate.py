"""Greedy text generation over any runtime that steps a cached decoder; streams decoded text."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

StepFn = Callable[[list[int], int], torch.Tensor]


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
) -> GenerationStats:
    """Greedy decoding: one prefill call, then one call per new token until EOS or the limit."""
    stats = GenerationStats(prompt_tokens=len(prompt_tokens))
    budget = min(max_new_tokens, max_seq_len - len(prompt_tokens))
    if budget <= 0:
        return stats
    start = time.perf_counter()
    logits = step(prompt_tokens, 0)
    token = int(torch.argmax(logits))
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
        token = int(torch.argmax(logits))
    stats.decode_seconds = time.perf_counter() - decode_start
    return stats
