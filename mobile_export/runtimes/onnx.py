"""ONNX Runtime on the host: an ``InferenceSession`` stepped like a runner, and ONNX Runtime GenAI.

:class:`OnnxRuntime` keeps the present KV tensors of each call and feeds them back as the next
call's past, so decode never re-runs the prompt. :func:`genai_generate` loads the bundle folder
with ``onnxruntime_genai`` (the library ONNX Runtime GenAI's Android and iOS packages wrap) and
generates greedily.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from mobile_export.errors import UserError
from mobile_export.runtimes.base import Runtime


def check_external_data(model_path: Path) -> None:
    """Refuse a graph whose external weights would be read from outside its folder (an
    initializer's ``location`` that is absolute, has '..' parts or leads out through a link)."""
    import onnx

    from mobile_export.bundle_paths import plain_relative_path_problem

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for broken files
        raise UserError(f"{model_path} is not a readable ONNX model: {exc}", hint="rebuild the bundle") from exc
    folder = model_path.parent.resolve()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key != "location":
                continue
            problem = plain_relative_path_problem(entry.value)
            if problem is None and not (folder / entry.value).resolve().is_relative_to(folder):
                problem = f"{entry.value!r} leads outside the folder"
            if problem:
                raise UserError(
                    f"{model_path}: external data of tensor {tensor.name}: {problem}",
                    hint="a bundle may only name its own files; rebuild the bundle",
                )


class OnnxRuntime(Runtime):
    """A loaded ``model.onnx``: ``step(tokens, start_pos)`` → last-token logits [vocab] (fp32)."""

    format = "onnxruntime-genai"

    def __init__(self, model_path: Path, threads: int | None = None):
        import onnxruntime as ort

        config_path = model_path.parent / "genai_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))["model"]
            decoder = config["decoder"]
            self.max_seq_len = int(config["context_length"])
            self.n_layers = int(decoder["num_hidden_layers"])
            self._kv_shape = (1, int(decoder["num_key_value_heads"]), 0, int(decoder["head_size"]))
            self._past_names = []
            for i in range(self.n_layers):
                self._past_names += [decoder["inputs"]["past_key_names"] % i, decoder["inputs"]["past_value_names"] % i]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{config_path} is missing or invalid: {exc}", hint="rebuild the bundle") from exc
        check_external_data(model_path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        start = time.perf_counter()
        try:
            self._session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise UserError(f"ONNX Runtime could not load {model_path}: {exc}", hint="rebuild the bundle") from exc
        self.load_seconds = time.perf_counter() - start
        kv_input = next(i for i in self._session.get_inputs() if i.name == self._past_names[0])
        self._kv_dtype = np.float16 if "float16" in kv_input.type else np.float32
        self._past: list[np.ndarray] = []
        self._length = 0

    def reset(self) -> None:
        """Drop the cached past (a step at position 0 starts from an empty one too)."""
        self._past, self._length = [], 0

    def _empty_past(self) -> list[np.ndarray]:
        return [np.zeros(self._kv_shape, dtype=self._kv_dtype) for _ in self._past_names]

    def logits_all(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Feed ``tokens`` at ``start_pos``; return every fed token's logits [T, vocab] (fp32)."""
        end = start_pos + len(tokens)
        if end > self.max_seq_len:
            raise UserError(
                f"sequence of {end} tokens exceeds the model's context of {self.max_seq_len}",
                hint="use a shorter prompt or fewer new tokens",
            )
        if start_pos == 0 or not self._past:
            past = self._empty_past()
        elif start_pos <= self._length:  # rewind: keep the first start_pos cached positions
            past = [p[:, :, :start_pos] for p in self._past]
        else:
            raise UserError(f"cannot step at position {start_pos}: only {self._length} positions are cached")
        feeds = {"input_ids": np.array([tokens], dtype=np.int64), "attention_mask": np.ones((1, end), dtype=np.int64)}
        feeds.update(zip(self._past_names, past, strict=True))
        logits, *presents = self._session.run(None, feeds)
        self._past, self._length = presents, end
        return torch.from_numpy(logits[0]).float()

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Feed ``tokens`` at ``start_pos``; return the last token's logits [vocab] (fp32)."""
        return self.logits_all(tokens, start_pos)[-1]


def genai_generate(folder: Path, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], dict]:
    """Greedy generation with ONNX Runtime GenAI from the bundle folder, as an app would load it.

    Returns the new tokens and timings (load, prefill, decode seconds).
    """
    import onnxruntime_genai as og

    start = time.perf_counter()
    try:
        model = og.Model(str(folder))
    except Exception as exc:  # og raises RuntimeError with the loader's message
        raise UserError(f"ONNX Runtime GenAI could not load {folder}: {exc}", hint="rebuild the bundle") from exc
    load = time.perf_counter() - start
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new_tokens)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt_ids)
    prefill = time.perf_counter() - start
    tokens: list[int] = []
    start = time.perf_counter()
    while not generator.is_done() and len(tokens) < max_new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    decode = time.perf_counter() - start
    return tokens, {"load_s": load, "prefill_s": prefill, "decode_s": decode}
