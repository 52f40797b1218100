"""The one stepping loop: drive a cached model the way a runner does.

Verification, fidelity and the reference protocol all step a runtime (or an eager cached
decoder) with ``step(tokens, start_pos) -> logits of the last token``: one prefill call at
position 0, then one token per call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

StepFn = Callable[[list[int], int], torch.Tensor]


def teacher_forced(step: StepFn, prefill: Sequence[int], feed: Sequence[int]) -> torch.Tensor:
    """Prefill ``prefill`` at position 0, then feed each token of ``feed`` in turn; the logits
    after the prefill and after every fed token, ``[1 + len(feed), vocab]`` (fp32)."""
    rows = [step(list(prefill), 0).reshape(-1).float()]
    for offset, token in enumerate(feed):
        rows.append(step([token], len(prefill) + offset).reshape(-1).float())
    return torch.stack(rows)
