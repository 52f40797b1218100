"""GGUF files as a model source (``--model-path FILE.gguf``, or a folder holding one ``.gguf``).

The header is read first with the ``gguf`` package (magic, architecture, tensor types), so a
truncated file, another format, an architecture we cannot export or a quant type the loader
cannot read is refused in seconds, before any weights are dequantized. Weights, config and
tokenizer then come through transformers' GGUF support. A GGUF model loaded that way carries
transformers' GGUF quantizer (it refuses ``save_pretrained`` and export), so its dequantized
weights are moved into a plain model built from the same config. Those dequantized weights are
the fidelity reference of the build: a Q4_1 source was 4-bit once already.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mobile_export.errors import UserError

GGUF_MAGIC = b"GGUF"
# GGUF architecture names whose transformers model_type differs (transformers' own renames).
MODEL_TYPE_OF_ARCH = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
REFERENCE_NOTE = "the GGUF's weights dequantized to float (the original model of this build)"


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself, read without dequantizing anything."""

    path: Path
    sha256: str
    architecture: str  # GGUF's name (general.architecture)
    model_type: str  # the transformers model_type it loads as
    name: str | None
    file_type: str | None  # general.file_type, e.g. "Q4_1" (llama.cpp's MOSTLY_Q4_1)
    tensor_types: dict[str, int]  # tensor count per GGML type, e.g. {"Q4_1": 210, "F32": 61}
    license: str | None = None  # general.license

    def manifest_entry(self) -> dict:
        """The manifest's record of the GGUF source (``model.gguf``)."""
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "architecture": self.architecture,
            "name": self.name,
            "file_type": self.file_type,
            "tensor_types": self.tensor_types,
            "license": self.license,
            "reference": REFERENCE_NOTE,
        }


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``--model-path`` names: the path itself when it is a file, or the one
    ``.gguf`` in a folder that holds no safetensors; None for an ordinary model folder."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise UserError(
            f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:3])})",
            hint="pass one of them with --model-path FILE.gguf",
        )
    return found[0] if found else None


def _transformers_gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return list(GGUF_SUPPORTED_ARCHITECTURES)


def supported_architectures() -> list[str]:
    """GGUF architectures transformers can load and this tool can export, sorted."""
    from mobile_export.families import model_types

    return sorted(
        arch
        for arch in _transformers_gguf_architectures()
        if MODEL_TYPE_OF_ARCH.get(arch, arch) in model_types()
    )


def readable_tensor_types() -> list[str]:
    """GGML tensor types the gguf package can dequantize (what transformers' loader calls)."""
    from gguf import quants

    traits = getattr(quants, "_type_traits", {})  # the package's own registry of block formats
    return sorted({"F32", "F16", *(t.name for t in traits)})


def _check_magic(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from exc
    if magic != GGUF_MAGIC:
        raise UserError(
            f"{path} is not a GGUF file (it does not start with 'GGUF')",
            hint="pass a .gguf file or a Hugging Face model folder with --model-path",
        )


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _file_type_name(value) -> str | None:
    from gguf import LlamaFileType

    if value is None:
        return None
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"unknown ({value})"


@functools.lru_cache(maxsize=4)
def _read_header_cached(path: Path, size: int, mtime_ns: int) -> GGUFHeader:
    from gguf import GGUFReader

    from mobile_export.bundle import sha256_file

    _check_magic(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # numpy raises ValueError/IndexError on a short or garbled file
        raise UserError(
            f"{path} is truncated or corrupt: cannot read its GGUF header and tensor index ({exc})",
            hint="re-download the file",
        ) from exc
    architecture = str(_field(reader, "general.architecture") or "")
    name = _field(reader, "general.name")
    supported = supported_architectures()
    model_type = MODEL_TYPE_OF_ARCH.get(architecture, architecture)
    if architecture == "llama" and name and "mistral" in str(name).lower():
        model_type = "mistral"  # llama.cpp writes Mistral models as 'llama'; transformers renames them
    if architecture not in supported:
        raise UserError(
            f"{path}: GGUF architecture '{architecture or '(none)'}' cannot be exported",
            hint="supported GGUF architectures: " + ", ".join(supported),
        )
    types = Counter(t.tensor_type.name for t in reader.tensors)
    readable = readable_tensor_types()
    unreadable = sorted(t for t in types if t not in readable)
    if unreadable:
        raise UserError(
            f"{path}: tensor type {unreadable[0]} cannot be dequantized by the GGUF loader",
            hint="readable types: " + ", ".join(readable),
        )
    return GGUFHeader(
        path=path,
        sha256=sha256_file(path),
        architecture=architecture,
        model_type=model_type,
        name=str(name) if name is not None else None,
        file_type=_file_type_name(_field(reader, "general.file_type")),
        tensor_types=dict(types.most_common()),
        license=str(_field(reader, "general.license") or "") or None,
    )


def read_header(path: Path) -> GGUFHeader:
    """Check a GGUF file's header and return what it says; one clear error for a file that is
    not GGUF, truncated, of an architecture we cannot export or with unreadable tensor types."""
    path = path.resolve()
    stat = path.stat()
    return _read_header_cached(path, stat.st_size, stat.st_mtime_ns)


def quiet_transformers():
    """transformers, with its warnings and progress bars off (quiet output); the loaders of
    :mod:`mobile_export.sources` use it too (this module is the one below them)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # quiet output: no per-tensor loading bars
    return transformers


def _transformers():
    return quiet_transformers()


def _loader_error(path: Path, what: str, exc: Exception) -> UserError:
    return UserError(f"cannot load the {what} in {path}: {exc}", hint="check the file, or convert it to safetensors")


@functools.lru_cache(maxsize=4)
def _config_cached(path: Path, size: int, mtime_ns: int):
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as exc:  # transformers raises ValueError/KeyError on metadata it cannot map
        raise _loader_error(path, "config", exc) from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def gguf_config(path: Path):
    """The transformers config a GGUF file loads as (header checked first)."""
    header = read_header(path)
    stat = header.path.stat()
    return _config_cached(header.path, stat.st_size, stat.st_mtime_ns)


@contextlib.contextmanager
def _no_dequantize_progress_bar() -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar (not behind its progress-bar switch)."""
    from transformers import modeling_gguf_pytorch_utils as loader

    original = loader.tqdm
    loader.tqdm = lambda iterable, **_kwargs: iterable
    try:
        yield
    finally:
        loader.tqdm = original


def load_gguf_model(path: Path, dtype: torch.dtype) -> nn.Module:
    """The GGUF's weights, dequantized to ``dtype``, in a plain transformers model."""
    transformers = _transformers()
    header = read_header(path)
    try:
        with _no_dequantize_progress_bar():
            loaded = transformers.AutoModelForCausalLM.from_pretrained(
                str(header.path.parent), gguf_file=header.path.name, dtype=dtype, trust_remote_code=False
            )
    except Exception as exc:  # dequantization or tensor-name mapping failures
        raise _loader_error(path, "weights", exc) from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A plain model of the same config, built without memory (meta device), takes over the loaded
    # tensors: its weights by state dict, then every buffer (rope frequencies are not in it).
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    for name, buffer in loaded.named_buffers():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{path}: the GGUF loader left {left[0]} unset", hint="convert the file to safetensors")
    return model.eval()


def load_gguf_tokenizer(path: Path):
    """The GGUF's tokenizer as a transformers fast tokenizer (its chat template included)."""
    transformers = _transformers()
    header = read_header(path)
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(header.path.parent), gguf_file=header.path.name, trust_remote_code=False
        )
    except Exception as exc:  # unknown tokenizer model in the GGUF metadata
        raise _loader_error(path, "tokenizer", exc) from exc
