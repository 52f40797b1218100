"""Core ML's runtime (macOS 15+ only): load a stateful .mlpackage and step it like a runner.

This module also owns the package's calling convention, which the Core ML backend
(:mod:`mobile_export.backends.coreml`) builds to: inputs ``input_ids`` (int32) and ``causal_mask``
(fp16 additive, see :func:`causal_mask`), output ``logits``, one fp16 state per layer and kind
named by :func:`state_name`; and how coremltools is imported quietly (both sides need it).
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mobile_export.console import quiet_loggers
from mobile_export.errors import UserError
from mobile_export.runtimes.base import Runtime


@contextlib.contextmanager
def quiet_coremltools() -> Iterator[None]:
    """Hide coremltools' progress bars and its warnings about untested torch versions."""
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        # progress bars (tqdm) and notices go to stderr; errors still raise
        with quiet_loggers("coremltools"), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def import_coremltools():
    """coremltools, imported with its native-library notices silenced."""
    with quiet_coremltools():
        import coremltools as ct
    return ct


def state_name(layer: int, kind: str) -> str:
    """A KV-cache state's name in the Core ML package (the torch buffer path, '.' -> '_')."""
    return f"decoder_layers_{layer}_self_attn_{kind}"


def causal_mask(start_pos: int, seq: int) -> np.ndarray:
    """fp16 [1, 1, seq, start_pos + seq] additive mask: 0 where a query may attend, -inf elsewhere
    (the same mask the export wrapper builds when it is given none)."""
    from mobile_export.modeling import additive_causal_mask

    return additive_causal_mask(start_pos, seq, start_pos + seq, torch.float16).numpy()


class CoreMLRuntime(Runtime):
    """A loaded Core ML package with one KV-cache state, stepped with ``step(tokens, start_pos)``."""

    format = "coreml-mlpackage"

    def __init__(self, package: Path):
        if platform.system() != "Darwin":
            raise UserError(
                f"Core ML packages run only on macOS 15+ or iOS 18+ (this is {platform.system()})",
                hint="run the bundle on a Mac or an iPhone, or build with --backend xnnpack to run it here",
            )
        ct = import_coremltools()
        start = time.perf_counter()
        try:
            self._model = ct.models.MLModel(str(package))
        except Exception as exc:  # coremltools raises a variety of errors for bad packages
            raise UserError(f"Core ML could not load {package}: {exc}", hint="rebuild the bundle") from exc
        self.load_seconds = time.perf_counter() - start
        metadata = self._model.user_defined_metadata
        self.max_seq_len = int(metadata["mobile_export.context_length"])
        self._state = self._model.make_state()

    def reset(self) -> None:
        """A fresh KV-cache state (a step at position 0 makes one too)."""
        self._state = self._model.make_state()

    def metadata(self, name: str):
        """The package's user-defined metadata value ``name`` (a string), or None."""
        return self._model.user_defined_metadata.get(name)

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Feed ``tokens`` at ``start_pos`` (0 starts a new sequence); last-token logits [vocab]."""
        if start_pos == 0:
            self.reset()
        inputs = {
            "input_ids": np.asarray([tokens], dtype=np.int32),
            "causal_mask": causal_mask(start_pos, len(tokens)),
        }
        out = self._model.predict(inputs, state=self._state)
        return torch.from_numpy(np.asarray(out["logits"], dtype=np.float32)).reshape(-1)
