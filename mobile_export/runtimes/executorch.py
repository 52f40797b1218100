"""ExecuTorch's runtime on the host: load a .pte and run prefill/decode steps."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from mobile_export.errors import UserError
from mobile_export.runtimes.base import Runtime

# ExecuTorch delegates whose programs the host's runtime cannot run (manifest ``artifact.delegate``)
DEVICE_ONLY_DELEGATES = {"CoreMLBackend": "Core ML"}

_NATIVE_LOGS = {"shown": False}


def show_native_logs(shown: bool = True) -> None:
    """Let native runtime logs through (``--verbose``) instead of silencing them."""
    _NATIVE_LOGS["shown"] = shown


@contextlib.contextmanager
def native_output_silenced(streams: tuple[int, ...] = (1, 2)) -> Iterator[None]:
    """Send what native code writes to stdout/stderr to /dev/null (ExecuTorch's C++ logs CPU
    probing, kernel notices and runner statistics there); Python-level output is flushed first
    and unaffected after. A no-op after :func:`show_native_logs` (``--verbose``)."""
    if _NATIVE_LOGS["shown"]:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in streams]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in streams:
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in zip(streams, saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def load_runtime_ops() -> None:
    """Register the kernels our programs may call outside XNNPACK (LLM custom ops, quantized ops)."""
    with native_output_silenced():
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
        from executorch.kernels import quantized  # noqa: F401
        from executorch.runtime import Runtime

        Runtime.get()


class ExecuTorchRuntime(Runtime):
    """A loaded .pte whose ``forward(tokens, input_pos)`` returns last-token logits.

    Its KV cache lives in the program; a step at ``start_pos`` overwrites the cache from there and
    masks what lies beyond, so a new sequence needs no reset."""

    format = "executorch-pte"

    @classmethod
    def open(cls, pte_path: Path, artifact: dict) -> ExecuTorchRuntime:
        """Load ``pte_path``; a program delegated to a device-only backend is refused first."""
        platform = DEVICE_ONLY_DELEGATES.get(artifact.get("delegate"))
        if platform is not None:
            raise UserError(
                f"{pte_path.name} is delegated to {platform}, which runs only on iOS/macOS",
                hint="run it with ExecuTorch's iOS runtime, or build with --backend xnnpack to run it here",
            )
        return cls(pte_path)

    def __init__(self, pte_path: Path):
        load_runtime_ops()
        from executorch.runtime import Runtime

        start = time.perf_counter()
        try:
            with native_output_silenced():
                self._program = Runtime.get().load_program(str(pte_path))
                self._method = self._program.load_method("forward")
        except Exception as exc:  # the runtime raises RuntimeError/ValueError with codes
            raise UserError(f"ExecuTorch could not load {pte_path}: {exc}", hint="rebuild the bundle") from exc
        self.load_seconds = time.perf_counter() - start
        self.max_seq_len = self.metadata("get_max_seq_len")
        self.vocab_size = self.metadata("get_vocab_size")

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
        bad = [t for t in tokens if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
        if bad:  # an out-of-range id aborts the process inside ExecuTorch's embedding kernel
            raise UserError(
                f"token id {bad[0]} is outside the model's vocabulary of {self.vocab_size}",
                hint="the bundle's tokenizer or reference does not belong to its model; rebuild the bundle",
            )
        ids = torch.tensor([tokens], dtype=torch.long)
        pos = torch.tensor([start_pos], dtype=torch.long)
        with native_output_silenced():
            out = self._method.execute([ids, pos])[0]
        return out.reshape(-1, out.shape[-1])[-1].float()


def runner_generate(
    pte_path: Path, tokenizer_path: Path, prompt: str, max_new_tokens: int, num_bos: int
) -> tuple[str | None, dict]:
    """Greedy generation with ExecuTorch's own C++ LLM runner (the one its mobile libraries wrap).

    Returns the generated text (None when the runner handed Python a partial UTF-8 piece, which
    its binding cannot decode) and the runner's stats.
    """
    import json

    load_runtime_ops()
    with native_output_silenced():  # its tokenizer library logs a regex notice on import
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    try:
        with native_output_silenced():
            runner = TextLLMRunner(str(pte_path), str(tokenizer_path))
    except RuntimeError as exc:
        raise UserError(f"ExecuTorch's LLM runner cannot load {pte_path}: {exc}") from exc
    pieces: list[str] = []
    stats: list[dict] = []
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, echo=False, num_bos=num_bos)
    try:
        with native_output_silenced():
            runner.generate(prompt, config, pieces.append, lambda s: stats.append(json.loads(s.to_json_string())))
    except UnicodeDecodeError:
        return None, stats[-1] if stats else {}
    return "".join(pieces), stats[-1] if stats else {}
