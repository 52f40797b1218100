"""ExecuTorch's runtime on the host: load a .pte and run prefill/decode steps."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mobile_export.errors import UserError


def load_runtime_ops() -> None:
    """Register the kernels our programs may call outside XNNPACK (LLM custom ops, quantized ops)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401


class ExecuTorchDecoder:
    """A loaded .pte whose ``forward(tokens, input_pos)`` returns last-token logits."""

    def __init__(self, pte_path: Path):
        load_runtime_ops()
        from executorch.runtime import Runtime

        start = time.perf_counter()
        try:
            self._program = Runtime.get().load_program(str(pte_path))
            self._method = self._program.load_method("forward")
        except Exception as exc:  # the runtime raises RuntimeError/ValueError with codes
            raise UserError(f"ExecuTorch could not load {pte_path}: {exc}", hint="rebuild the bundle") from exc
        self.load_seconds = time.perf_counter() - start
        self.max_seq_len = self.metadata("get_max_seq_len")

    def metadata(self, name: str):
        """Value of a constant metadata method (e.g. ``get_max_seq_len``), or None if absent."""
        if name not in self._program.method_names:
            return None
        values = self._program.load_method(name).execute([])
        value = values[0]
        if isinstance(value, torch.Tensor):
            return value.tolist()
        return value

    def method_names(self) -> set[str]:
        """Names of every method in the program."""
        return set(self._program.method_names)

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Feed ``tokens`` at ``start_pos``; return the last token's logits [vocab] (fp32)."""
        if start_pos + len(tokens) > self.max_seq_len:
            raise UserError(
                f"sequence of {start_pos + len(tokens)} tokens exceeds the model's context of {self.max_seq_len}",
                hint="use a shorter prompt or fewer new tokens",
            )
        ids = torch.tensor([tokens], dtype=torch.long)
        pos = torch.tensor([start_pos], dtype=torch.long)
        out = self._method.execute([ids, pos])[0]
        return out.reshape(-1, out.shape[-1])[-1].float()
