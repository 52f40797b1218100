"""Calibration text for GPTQ and AWQ: a text file cut into token windows, and the activations
that enter a decoder layer's linears, captured one layer at a time.

The calibration windows are embedded once; then for each decoder layer the hidden states of
every window go through that layer (already quantized where the algorithm has finished with
it) to become the next layer's input, so later layers are calibrated on what the quantized
model feeds them, and only one layer's activations are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mobile_export.errors import UserError

MIN_TOKENS = 1024  # fewer and the Hessian of a 1-2k wide layer is mostly dampening
MAX_TOKENS = 8192  # more costs time for little gain (measured on the trained test model)
WINDOW = 512  # tokens per calibration window (at most the context length)
# Shipped broad calibration text (prose, dialogue, code; see assets/text/README.md), used
# when --calib-text is not given.
DEFAULT_CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "assets" / "text" / "calibration.txt"


@dataclass
class Calibration:
    """Token windows from a calibration text file."""

    path: Path
    windows: list[list[int]]

    @property
    def tokens(self) -> int:
        """Tokens in all windows."""
        return sum(len(w) for w in self.windows)

    def describe(self) -> dict:
        """Manifest entry: file name, tokens and windows used."""
        return {"file": self.path.name, "tokens": self.tokens, "windows": len(self.windows)}


def load_calibration(
    path: Path | None,
    encode: Callable[[str], list[int]],
    algo: str,
    max_seq_len: int,
    vocab_size: int,
    min_tokens: int = MIN_TOKENS,
    max_tokens: int = MAX_TOKENS,
) -> Calibration:
    """Read ``path`` (None: :data:`DEFAULT_CALIBRATION_TEXT`) and cut its tokens into windows of
    up to :data:`WINDOW` tokens.

    Refuses a missing, unreadable or too short file, naming how many tokens it has and needs.
    """
    path = path if path is not None else DEFAULT_CALIBRATION_TEXT
    if not path.is_file():
        raise UserError(f"calibration text {path} does not exist", hint="pass --calib-text FILE (plain text)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read calibration text {path}: {exc}", hint="pass a UTF-8 text file") from exc
    # a generous character budget: no tokenizer yields fewer than one token per 32 characters
    ids = [min(int(t), vocab_size - 1) for t in encode(text[: max_tokens * 32])]
    if len(ids) < min_tokens:
        raise UserError(
            f"calibration text {path} has {len(ids)} tokens; --quant-algo {algo} needs at least {min_tokens}",
            hint="pass a longer --calib-text (text like what the model will see)",
        )
    ids = ids[:max_tokens]
    window = max(16, min(WINDOW, max_seq_len))
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    if len(windows) > 1 and len(windows[-1]) < window // 4:
        windows.pop()  # a scrap at the end adds little
    return Calibration(path=path, windows=windows)


class _Stop(Exception):
    """Raised by a capture hook: the rest of the layer's forward is not needed."""


@contextmanager
def capture_inputs(linears: list[nn.Linear], sink: Callable[[torch.Tensor], None], stop: bool = True) -> Iterator[None]:
    """While active, the first of ``linears`` to run hands its input [tokens, in] to ``sink`` and
    (``stop``) ends the forward pass there: the linears of one stage share their input."""

    def hook(_module, args):
        sink(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        if stop:
            raise _Stop

    handles = [linear.register_forward_pre_hook(hook) for linear in linears]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def stage_inputs(decoder, index: int, hidden: list[torch.Tensor], linears: list[nn.Linear], sink) -> None:
    """Run layer ``index`` on every window until ``linears`` are reached; feed their inputs to ``sink``."""
    with capture_inputs(linears, sink):
        for h in hidden:
            try:
                decoder.run_layer(index, h)
            except _Stop:
                continue
            raise RuntimeError(f"layer {index} never called {type(linears[0]).__name__} during calibration")


def next_hidden(decoder, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of layer ``index`` (as quantized so far) for every window."""
    return [decoder.run_layer(index, h).float() for h in hidden]


def embed_windows(decoder, calibration: Calibration) -> list[torch.Tensor]:
    """Hidden states [1, T, D] entering the first layer, one per window."""
    with torch.no_grad():
        return [decoder.embed_tokens(torch.tensor([w], dtype=torch.long)).float() for w in calibration.windows]
