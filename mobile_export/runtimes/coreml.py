"""Core ML's runtime (macOS 15+ only): load a stateful .mlpackage and step it like a runner."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

from mobile_export.errors import UserError


def causal_mask(start_pos: int, seq: int) -> np.ndarray:
    """fp16 [1, 1, seq, start_pos + seq] additive mask: 0 where a query may attend, -inf elsewhere
    (the same mask the export wrapper builds when it is given none)."""
    from mobile_export.modeling import additive_causal_mask

    return additive_causal_mask(start_pos, seq, start_pos + seq, torch.float16).numpy()


class CoreMLDecoder:
    """A loaded Core ML package with one KV-cache state, stepped with ``step(tokens, start_pos)``."""

    def __init__(self, package: Path):
        if platform.system() != "Darwin":
            raise UserError(
                f"Core ML packages run only on macOS 15+ or iOS 18+ (this is {platform.system()})",
                hint="run the bundle on a Mac or an iPhone, or build with --backend xnnpack to run it here",
            )
        from mobile_export.targets.coreml import import_coremltools

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

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Feed ``tokens`` at ``start_pos`` (0 starts a new sequence); last-token logits [vocab]."""
        if start_pos == 0:
            self._state = self._model.make_state()
        inputs = {
            "input_ids": np.asarray([tokens], dtype=np.int32),
            "causal_mask": causal_mask(start_pos, len(tokens)),
        }
        out = self._model.predict(inputs, state=self._state)
        return torch.from_numpy(np.asarray(out["logits"], dtype=np.float32)).reshape(-1)
