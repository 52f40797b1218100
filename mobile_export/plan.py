"""The build plan: what ``mobile-export build`` was asked (:class:`BuildRequest`) merged once with
the recipe into one frozen, validated :class:`BuildPlan` (:func:`resolve_plan`).

Every "command line, else recipe" decision is taken here and nowhere else; the pipeline stages
(:mod:`mobile_export.stages`) read only the plan. Resolving a plan does no heavy work: it
validates the backend, scheme, options, context length and KV budget, so a bad combination is
refused before any model is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mobile_export.errors import UserError
from mobile_export.preflight import read_config_json
from mobile_export.quantize import QuantSpec
from mobile_export.recipes import Recipe, TargetSettings, load_recipe, recipe_from_model_config
from mobile_export.sources import SourceOptions

if TYPE_CHECKING:
    from mobile_export.backends import Backend, BackendOptions


@dataclass
class BuildRequest:
    """Everything ``mobile-export build`` was asked to do."""

    recipe: str | None
    target: str
    model_path: Path | None = None
    backend: str | None = None
    quant: str | None = None
    group_size: int | None = None
    embedding_quant: str | None = None
    embedding_group_size: int | None = None
    context_length: int | None = None
    output_dir: Path = Path("dist")
    force: bool = False
    random_weights: bool = False
    seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    keep_unverified: bool = False
    revision: str | None = None
    compute_units: str | None = None
    min_ios: str | None = None
    kv_budget_mb: float | None = None
    compile_mlmodelc: bool = False
    opset: int | None = None
    min_onnxruntime: str | None = None
    quant_algo: str | None = None
    calib_text: Path | None = None
    rotate: bool | None = None
    keep_8bit: tuple[str, ...] = ()
    group_size_for: tuple[str, ...] = ()  # "PATTERN=N", as typed
    eval_text: Path | None = None
    no_eval: bool = False


@dataclass(frozen=True)
class BuildPlan:
    """One build, fully decided: recipe and command line merged once, every choice validated.

    ``backend`` is the (stateless) backend object named ``backend_name``; ``options`` are its
    checked and completed options; ``kv_bytes`` the static KV cache's size (None when the
    config lacks the usual keys).
    """

    recipe: Recipe
    target: str
    settings: TargetSettings  # the recipe's settings for ``target``
    backend_name: str
    backend: Backend = field(repr=False, compare=False)
    spec: QuantSpec
    options: BackendOptions  # checked and completed by the backend
    context_length: int
    kv_bytes: int | None
    source: SourceOptions
    name: str  # bundle folder name
    output_dir: Path
    bundle_dir: Path
    zip_path: Path
    force: bool = False
    keep_unverified: bool = False
    seed: int = 0
    calib_text: Path | None = None
    eval_text: Path | None = None  # None: the project's fixed text (when evaluating)
    evaluate: bool = True  # False: --no-eval

    def __post_init__(self) -> None:
        if self.backend_name != getattr(self.backend, "name", None):
            raise ValueError(f"plan for backend '{self.backend_name}' holds backend {self.backend!r}")
        if self.context_length < 32:
            raise ValueError(f"context length {self.context_length} below 32 passed validation")

    @property
    def random_weights(self) -> bool:
        return self.source.random_weights


def resolve_recipe(request: BuildRequest) -> Recipe:
    """The recipe named, or one made from a local folder's config.json with target defaults."""
    if request.recipe:
        return load_recipe(request.recipe)
    if request.model_path is None:
        raise UserError("nothing to build", hint="name a recipe, or pass --model-path DIR")
    if not request.model_path.exists():
        what = "GGUF file" if request.model_path.suffix == ".gguf" else "model folder"
        raise UserError(f"{what} {request.model_path} does not exist")
    from mobile_export.gguf_source import find_gguf, gguf_config

    gguf = find_gguf(request.model_path)
    if gguf is not None:
        config = gguf_config(gguf).to_dict()
        stem = gguf.stem
    elif not request.model_path.is_dir():
        raise UserError(
            f"model path {request.model_path} is not a folder",
            hint="pass a Hugging Face model folder or a .gguf file",
        )
    else:
        config = read_config_json(request.model_path)
        stem = request.model_path.resolve().name
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    return recipe_from_model_config(config, name)


def resolve_plan(request: BuildRequest, recipe: Recipe) -> BuildPlan:
    """Merge ``request`` over ``recipe`` once and validate the result (no heavy work).

    Checks run in a fixed order, so the first problem a user sees does not depend on the
    caller: target, backend, scheme and algorithm, backend options, context length, KV budget.
    """
    from mobile_export.backends import get_backend
    from mobile_export.bundle import bundle_name

    settings = recipe.target(request.target)
    backend = get_backend(request.backend or settings.backend)
    spec = quant_spec(recipe, request, backend)
    options = backend.check_options(backend_options(recipe, request, backend), spec)
    max_seq_len = context_length(recipe, request)
    kv_bytes = check_kv_budget(recipe, request, max_seq_len, backend)
    name = bundle_name(recipe.name, request.target, backend.name, settings.backend)
    return BuildPlan(
        recipe=recipe,
        target=request.target,
        settings=settings,
        backend_name=backend.name,
        backend=backend,
        spec=spec,
        options=options,
        context_length=max_seq_len,
        kv_bytes=kv_bytes,
        source=SourceOptions(
            model_path=request.model_path,
            random_weights=request.random_weights,
            seed=request.seed,
            allow_pickle=request.allow_pickle,
            trust_remote_code=request.trust_remote_code,
            revision=request.revision,
        ),
        name=name,
        output_dir=request.output_dir,
        bundle_dir=request.output_dir / name,
        zip_path=request.output_dir / f"{name}.zip",
        force=request.force,
        keep_unverified=request.keep_unverified,
        seed=request.seed,
        calib_text=request.calib_text,
        eval_text=request.eval_text,
        evaluate=not request.no_eval,
    )


def quant_spec(recipe: Recipe, request: BuildRequest, backend: Backend) -> QuantSpec:
    """The recipe's quantization for the target (or the backend's default when the user picked
    another backend than the recipe's), with command-line overrides applied."""
    from mobile_export.quant_algos.support import check_algorithm_support

    target = recipe.target(request.target)
    settings = target.quant_for(backend.name) or backend.default_quant
    scheme = request.quant if request.quant is not None else settings.scheme
    backend.check(request.target, scheme)
    embedding = request.embedding_quant if request.embedding_quant is not None else settings.embedding
    group_size = request.group_size if request.group_size is not None else settings.group_size
    if request.embedding_group_size is not None:
        embedding_groups = request.embedding_group_size
    elif request.embedding_quant is None and request.group_size is None:
        embedding_groups = settings.embedding_group_size
    else:  # the user changed the embedding or the groups: the recipe's embedding groups no longer apply
        embedding_groups = None
    # the recipe's algorithm, 8-bit layers and groups were chosen for its scheme: another --quant drops them
    own_scheme = scheme == settings.scheme
    spec = QuantSpec(
        scheme=scheme,
        group_size=group_size,
        embedding=embedding,
        weight_only=backend.weight_only,
        algo=request.quant_algo if request.quant_algo is not None else ((own_scheme and settings.algo) or "rtn"),
        rotate=request.rotate if request.rotate is not None else bool(own_scheme and settings.rotate),
        keep_8bit=tuple(request.keep_8bit) or (tuple(settings.keep_8bit or ()) if own_scheme else ()),
        embedding_group_size=embedding_groups if embedding == "int4" else None,
        group_sizes=parse_group_sizes(request.group_size_for)
        if request.group_size_for
        else (tuple((settings.group_sizes or {}).items()) if own_scheme and request.group_size is None else ()),
    )
    check_algorithm_support(backend, spec, request.calib_text)
    return spec


def parse_group_sizes(values: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``--group-size-for PATTERN=N`` values as (pattern, N) pairs."""
    pairs = []
    for value in values:
        pattern, _, size = value.rpartition("=")
        if not pattern or not size.strip().isdigit():
            raise UserError(
                f"--group-size-for '{value}' is not PATTERN=N",
                hint="e.g. --group-size-for 're:layers\\.\\d+\\.mlp\\.(gate|up)_proj=64'",
            )
        pairs.append((pattern, int(size)))
    return tuple(pairs)


def context_length(recipe: Recipe, request: BuildRequest) -> int:
    """KV-cache length: the command line's or the recipe's, checked against the model."""
    length = request.context_length if request.context_length is not None else recipe.context_length
    max_positions = recipe.config.get("max_position_embeddings")
    if length < 32:
        raise UserError(f"context length {length} is too small", hint="use at least 32 tokens")
    if isinstance(max_positions, int) and length > max_positions:
        raise UserError(
            f"context length {length} exceeds the model's {max_positions} positions",
            hint=f"use --context-length {max_positions} or less",
        )
    return length


def kv_cache_bytes(config: dict, max_seq_len: int, bytes_per_value: int) -> int | None:
    """Bytes of a static KV cache for a transformers config dict (keys and values, every layer);
    None when the config lacks the usual keys (the architecture check then explains)."""
    if not all(k in config for k in ("num_attention_heads", "num_hidden_layers", "hidden_size")):
        return None
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return 2 * int(config["num_hidden_layers"]) * kv_heads * head_dim * max_seq_len * bytes_per_value


def check_kv_budget(recipe: Recipe, request: BuildRequest, max_seq_len: int, backend: Backend) -> int | None:
    """The KV cache's size in bytes, refused when above the budget (command line, else recipe)."""
    import torch

    budget = request.kv_budget_mb if request.kv_budget_mb is not None else recipe.target(request.target).kv_budget_mb
    size = kv_cache_bytes(recipe.config, max_seq_len, torch.finfo(backend.cache_dtype).bits // 8)
    if budget is not None and size is not None and size > budget * 2**20:
        fits = max(1, int(budget * 2**20 // (size // max_seq_len)))
        raise UserError(
            f"the KV cache needs {size / 2**20:.3g} MB for {max_seq_len} tokens, over the {budget:g} MB budget",
            hint=f"use --context-length {fits} or less, or raise --kv-budget-mb",
        )
    return size


def backend_options(recipe: Recipe, request: BuildRequest, backend: Backend) -> BackendOptions:
    """Compute units and deployment target: command line first, then the recipe's target (whose
    values are for its own backend, so they are dropped when another backend takes no options)."""
    from mobile_export.backends import BackendOptions

    settings = recipe.target(request.target)
    onnx = {"opset": request.opset, "min_onnxruntime": request.min_onnxruntime}
    if "compute_units" not in backend.option_names:
        return BackendOptions(
            compute_units=request.compute_units,
            deployment_target=request.min_ios,
            compile_mlmodelc=request.compile_mlmodelc or None,
            **onnx,
        )
    return BackendOptions(
        compute_units=request.compute_units or settings.compute_units,
        deployment_target=request.min_ios or settings.min_ios,
        compile_mlmodelc=request.compile_mlmodelc or None,
        **onnx,
    )
