"""Where weights come from: a local Hugging Face folder, a GGUF file, the recipe's hub id, weights
shipped with the package (built-in recipes), or random weights.

Safety defaults: safetensors only (pickle checkpoints need ``--allow-pickle``), and
``trust_remote_code`` off unless ``--trust-remote-code`` is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mobile_export.errors import UserError
from mobile_export.gguf_source import (
    GGUFHeader,
    find_gguf,
    gguf_config,
    load_gguf_model,
    load_gguf_tokenizer,
    quiet_transformers,
    read_header,
)
from mobile_export.preflight import FP32_LOAD_LIMIT_BYTES, read_config_json, weight_shape_mismatch
from mobile_export.recipes import Recipe

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEMO_TOKENIZER_DIR = ASSETS_DIR / "demo"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
@dataclass
class SourceOptions:
    """How the user asked for weights."""

    model_path: Path | None = None
    random_weights: bool = False
    seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass
class Source:
    """A loaded original model with its tokenizer and provenance."""

    model: nn.Module
    tokenizer: object
    weights: str  # "hub", "local", "builtin" or "random"
    parameters: int
    dtype: torch.dtype
    hf_id: str | None = None
    revision: str | None = None
    own_tokenizer: bool = True
    notes: list[str] = field(default_factory=list)
    source_format: str | None = None  # "safetensors", "pickle" or "gguf" (None: random weights)
    gguf: GGUFHeader | None = None  # the GGUF file's header, for GGUF sources
    generation_eos_ids: list[int] = field(default_factory=list)  # the model's generation_config stop ids


def count_parameters(config) -> int:
    """Parameter count of the architecture, from a meta-device build (no memory used)."""
    transformers = quiet_transformers()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def load_dtype(parameters: int) -> torch.dtype:
    """fp32 when an fp32 copy fits the budget, else bf16."""
    return torch.float32 if parameters * 4 <= FP32_LOAD_LIMIT_BYTES else torch.bfloat16


def config_from_recipe(recipe: Recipe):
    """A transformers config built offline from the recipe's config block."""
    transformers = quiet_transformers()
    fields = dict(recipe.config)
    model_type = fields.pop("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except ValueError as exc:
        raise UserError(f"recipe '{recipe.name}': unsupported architecture '{model_type}': {exc}") from exc


def check_weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The folder's weight files; refuses pickle-only folders and corrupt safetensors."""
    safetensors = sorted(folder.glob("*.safetensors"))
    if not safetensors:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise UserError(f"no weights in {folder}", hint="expected *.safetensors files, or use --random-weights")
        if not allow_pickle:
            raise UserError(
                f"{folder} has only pickle weights ({pickles[0].name})",
                hint="convert them to safetensors, or pass --allow-pickle if you trust the files",
            )
        return pickles
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"corrupt {index.name} in {folder}", hint="re-download the model") from exc
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise UserError(f"{folder} is missing weight shard {missing[0]}", hint="re-download the model")
    from safetensors import safe_open

    for path in safetensors:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise UserError(
                f"corrupt safetensors file {path}: {exc}", hint="re-download or re-save the weights"
            ) from exc
    return safetensors


def _load_tokenizer(folder: Path, trust_remote_code: bool):
    transformers = quiet_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError/ValueError for missing or broken files
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"the tokenizer in {folder} needs its own Python code", hint="pass --trust-remote-code if you trust it"
            ) from exc
        raise UserError(
            f"cannot load a tokenizer from {folder}: {exc}", hint="the folder needs tokenizer.json"
        ) from exc


def demo_tokenizer():
    """The project's own byte-level BPE tokenizer (used by the demo and random-weight builds)."""
    return _load_tokenizer(DEMO_TOKENIZER_DIR, trust_remote_code=False)


def _load_config(folder: Path, trust_remote_code: bool):
    transformers = quiet_transformers()
    read_config_json(folder)  # a JSON object with usable sizes, or one error line
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"{folder} needs custom model code", hint="pass --trust-remote-code if you trust it"
            ) from exc
        raise UserError(f"unsupported model in {folder}: {exc}") from exc
    except Exception as exc:  # odd values transformers does not check (e.g. a string where a dict goes)
        raise UserError(f"unsupported model in {folder}: {exc}", hint="fix or re-download config.json") from exc


def _random_model(config, dtype: torch.dtype, seed: int) -> nn.Module:
    transformers = quiet_transformers()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def builtin_weights(recipe: Recipe) -> Path | None:
    """The weights a built-in recipe ships with (``assets/<name>/model.safetensors``), if any."""
    path = ASSETS_DIR / recipe.name / "model.safetensors"
    return path if recipe.source == "builtin" and path.is_file() else None


def _builtin_model(config, weights: Path, dtype: torch.dtype) -> nn.Module:
    """The recipe's architecture with its shipped weights (stored fp16, loaded at ``dtype``)."""
    from safetensors.torch import load_file

    model = quiet_transformers().AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {name: tensor.to(dtype) for name, tensor in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise UserError(
            f"{weights} does not fit recipe config: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}",
            hint="retrain it with tools/train_demo_model.py",
        )
    model.tie_weights()
    return model.eval()


def _pretrained_model(folder: Path, dtype: torch.dtype, options: SourceOptions) -> nn.Module:
    transformers = quiet_transformers()
    weights = check_weight_files(folder, options.allow_pickle)
    use_safetensors = weights[0].suffix == ".safetensors"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=use_safetensors, trust_remote_code=options.trust_remote_code
        )
    except Exception as exc:  # transformers wraps many failure kinds
        mismatched = "mismatched" in str(exc) and use_safetensors
        mismatch = (
            weight_shape_mismatch(folder, _load_config(folder, options.trust_remote_code)) if mismatched else None
        )
        raise UserError(
            f"cannot load the model in {folder}: {mismatch or exc}", hint="check the folder's weights and config"
        ) from exc
    return model.eval()


def download(recipe: Recipe, options: SourceOptions) -> Path:
    """The recipe's hub snapshot at its pinned revision (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    if options.allow_pickle:
        patterns.append("*.bin")
    revision = options.revision or recipe.revision
    try:
        return Path(snapshot_download(recipe.hf_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # network, auth (gated repos) or missing revision
        hint = "accept the license on huggingface.co and set HF_TOKEN" if recipe.gated else "check the network"
        raise UserError(
            f"could not download {recipe.hf_id}@{revision}: {type(exc).__name__}",
            hint=f"{hint}, or pass --model-path DIR or --random-weights",
        ) from exc


def _generation_eos_ids(model: nn.Module) -> list[int]:
    """Stop ids of the model's generation_config (generation_config.json, else its config)."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    values = value if isinstance(value, list | tuple) else [value]
    return [int(v) for v in values if isinstance(v, int)]


def load_source(recipe: Recipe, options: SourceOptions) -> Source:
    """Load the original model and tokenizer the way the user asked."""
    folder = options.model_path
    gguf = None
    if folder is not None:
        gguf = find_gguf(folder) if folder.exists() else None
        if gguf is not None:
            config = gguf_config(gguf)  # the header is checked first: bad files fail in seconds
        elif not folder.exists():
            what = "GGUF file" if folder.suffix == ".gguf" else "model folder"
            raise UserError(f"{what} {folder} does not exist")
        elif not folder.is_dir():
            raise UserError(f"model path {folder} is not a folder", hint="pass a Hugging Face model folder or a .gguf file")
        else:
            config = _load_config(folder, options.trust_remote_code)
        if recipe.source == "hub" and config.model_type != recipe.architecture:
            raise UserError(
                f"{gguf or folder} holds a '{config.model_type}' model but recipe '{recipe.name}' is "
                f"'{recipe.architecture}'",
                hint="pick the matching recipe or leave the recipe out",
            )
    elif recipe.source == "hub" and not options.random_weights:
        folder = download(recipe, options)
        config = _load_config(folder, options.trust_remote_code)
    else:
        config = config_from_recipe(recipe)

    from mobile_export.families import family_of

    family_of(config)  # refuses an unregistered model type, naming the registered ones
    parameters = count_parameters(config)
    dtype = load_dtype(parameters)
    notes = []
    if dtype != torch.float32:
        notes.append("original model loaded in bf16 (an fp32 copy would exceed the memory budget)")
    source_format = None
    shipped = builtin_weights(recipe) if folder is None and not options.random_weights else None
    if shipped is not None:
        model = _builtin_model(config, shipped, dtype)
        weights = "builtin"
        tokenizer = _load_tokenizer(shipped.parent, trust_remote_code=False)
        own_tokenizer = True
    elif options.random_weights or folder is None:
        model = _random_model(config, dtype, options.seed)
        weights = "random"
        if gguf is not None:
            tokenizer, has_tokenizer = load_gguf_tokenizer(gguf), True
        else:
            has_tokenizer = folder is not None and any(
                (folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model")
            )
            tokenizer = _load_tokenizer(folder, options.trust_remote_code) if has_tokenizer else demo_tokenizer()
        own_tokenizer = has_tokenizer or recipe.source == "builtin"
        if not own_tokenizer:
            notes.append("random weights: bundled with the project's demo tokenizer")
    elif gguf is not None:
        model = load_gguf_model(gguf, dtype)
        weights, source_format = "local", "gguf"
        tokenizer = load_gguf_tokenizer(gguf)
        own_tokenizer = True
        header = read_header(gguf)
        notes.append(
            f"GGUF source {gguf.name} ({header.file_type or 'unknown'} quantization): "
            "the reference is its dequantized weights"
        )
    else:
        model = _pretrained_model(folder, dtype, options)
        weights = "local" if options.model_path is not None else "hub"
        source_format = "safetensors" if any(folder.glob("*.safetensors")) else "pickle"
        tokenizer = _load_tokenizer(folder, options.trust_remote_code)
        own_tokenizer = True
    return Source(
        model=model,
        tokenizer=tokenizer,
        weights=weights,
        parameters=parameters,
        dtype=dtype,
        hf_id=recipe.hf_id if weights == "hub" else None,
        revision=(options.revision or recipe.revision) if weights == "hub" else None,
        own_tokenizer=own_tokenizer,
        notes=notes,
        source_format=source_format,
        gguf=read_header(gguf) if gguf is not None and weights != "random" else None,
        generation_eos_ids=_generation_eos_ids(model) if own_tokenizer else [],
    )
