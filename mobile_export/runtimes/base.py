"""The one interface of an opened artifact: a runtime loader stepped like an LLM runner.

Every loader (:class:`~mobile_export.runtimes.executorch.ExecuTorchRuntime`,
:class:`~mobile_export.runtimes.coreml.CoreMLRuntime`,
:class:`~mobile_export.runtimes.onnx.OnnxRuntime`) opens one artifact format and implements
:class:`Runtime`; :func:`mobile_export.runtimes.open_bundle` picks the loader by the manifest's
``artifact.format``. Callers (run, verify, eval, fidelity, the host harness) use only this
interface. Not to be confused with :class:`mobile_export.modeling.ExportableDecoder`, the torch
module an artifact is exported from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch


class Runtime(ABC):
    """An opened artifact with one KV cache, fed tokens at positions like a runner.

    ``step(tokens, start_pos)`` feeds ``tokens`` at ``start_pos`` (0 starts a new sequence) and
    returns the last token's logits; ``logits_all`` returns every fed token's. ``load_seconds``
    is how long opening took, ``max_seq_len`` the context the artifact was built for.
    """

    format: ClassVar[str] = ""  # the manifest's artifact.format this loader opens
    load_seconds: float = 0.0
    max_seq_len: int = 0
    vocab_size: int | None = None  # where the artifact records it

    @classmethod
    def open(cls, path: Path, artifact: dict) -> Runtime:
        """Open the artifact at ``path``; ``artifact`` is the manifest's ``artifact`` entry (its
        format, delegate, ...), for refusals that need more than the file."""
        return cls(path)

    @abstractmethod
    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Feed ``tokens`` at ``start_pos``; return the last token's logits [vocab] (fp32)."""

    def logits_all(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Feed ``tokens`` at ``start_pos``; return every fed token's logits [T, vocab] (fp32).

        By default one token per step; a runtime whose program returns every position's logits
        overrides this with one call."""
        import torch

        rows = [self.step([token], start_pos + i).reshape(-1).float() for i, token in enumerate(tokens)]
        return torch.stack(rows)

    def reset(self) -> None:  # noqa: B027 - a no-op is right for caches a step at 0 overwrites
        """Forget the sequence so far (a step at position 0 does this too)."""

    def metadata(self, name: str):
        """A value the artifact itself records under ``name``, or None (none by default)."""
        return None
