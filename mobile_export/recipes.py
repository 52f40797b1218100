"""Recipes: one YAML per model (hub id + pinned revision, architecture, per-target settings).

A recipe is validated once, on load, by a strict pydantic schema; errors name the file, the
key and what was expected. Built-in recipes live in the project's ``recipes/`` folder; a
path to any ``.yaml`` file works too.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mobile_export.errors import UserError, describe_validation_error
from mobile_export.preflight import model_config_problem

TARGETS: tuple[str, ...] = ("android", "ios")
_SHA = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_CONTEXT_LENGTH = 2048


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantSettings(_Strict):
    """Quantization a target uses by default (names are checked by the backend); ``algo``,
    ``rotate`` and ``keep_8bit`` are the defaults of ``--quant-algo``, ``--rotate``, ``--keep-8bit``."""

    scheme: str
    group_size: int = 32
    embedding: str = "none"
    algo: Literal["rtn", "hqq", "gptq", "awq"] | None = None
    rotate: bool | None = None
    keep_8bit: list[str] | None = None
    embedding_group_size: int | None = None  # int4 embedding groups (default: group_size)
    group_sizes: dict[str, int] | None = None  # layer pattern -> its own group size (onnx)


COMPUTE_UNITS: tuple[str, ...] = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")


class TargetSettings(_Strict):
    """Backend and quantization for one target platform (Core ML also: compute units, minimum iOS)."""

    backend: str
    quant: QuantSettings
    compute_units: Literal["all", "cpu_only", "cpu_and_gpu", "cpu_and_ne"] | None = None
    min_ios: str | None = Field(default=None, pattern=r"^\d{2}(\.\d)?$")
    kv_budget_mb: float | None = Field(default=None, gt=0)
    backend_quant: dict[str, QuantSettings] | None = None  # when --backend picks another backend

    def quant_for(self, backend: str) -> QuantSettings | None:
        """This target's quantization for ``backend``: ``quant`` for its own backend, else the
        ``backend_quant`` entry (None: the backend's own default)."""
        if backend == self.backend:
            return self.quant
        return (self.backend_quant or {}).get(backend)


class Generation(_Strict):
    """Generation settings from the model's generation_config.json."""

    eos_token_ids: list[int] = Field(default_factory=list)


class Recipe(_Strict):
    """One model's export recipe."""

    name: str
    description: str = ""
    source: Literal["hub", "builtin", "local"] = "hub"
    hf_id: str | None = None
    revision: str | None = None
    license: str = "unknown"
    architecture: str
    context_length: int = Field(ge=16, le=131072)
    gated: bool = False
    config: dict
    generation: Generation = Field(default_factory=Generation)
    targets: dict[str, TargetSettings]

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]*", value):
            raise ValueError("lower-case letters, digits, '.', '-' and '_' only")
        return value

    @field_validator("config")
    @classmethod
    def _usable_sizes(cls, value: dict) -> dict:
        problem = model_config_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: dict[str, TargetSettings]) -> dict[str, TargetSettings]:
        for target, settings in value.items():
            if target not in TARGETS:
                raise ValueError(f"unknown target '{target}'; expected one of {', '.join(TARGETS)}")
            for backend in (settings.backend, *(settings.backend_quant or {})):
                # the backends a target can name, in preference order, come from the registry
                # (imported here: the backend modules import this one)
                from mobile_export.backends import target_backends

                if backend not in target_backends(target):
                    known = ", ".join(target_backends(target))
                    raise ValueError(f"backend '{backend}' is not valid for {target}; expected one of {known}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        model_type = self.config.get("model_type")
        if model_type != self.architecture:
            raise ValueError(f"architecture '{self.architecture}' differs from config.model_type '{model_type}'")
        if self.source == "hub":
            if not self.hf_id:
                raise ValueError("hub recipes need hf_id")
            if not self.revision or not _SHA.match(self.revision):
                raise ValueError("hub recipes need revision: a 40-character commit sha")
        max_pos = self.config.get("max_position_embeddings")
        if isinstance(max_pos, int) and self.context_length > max_pos:
            raise ValueError(f"context_length {self.context_length} exceeds max_position_embeddings {max_pos}")
        return self

    def target(self, name: str) -> TargetSettings:
        """Settings for one target, or a clear error if the recipe has none."""
        if name not in TARGETS:
            raise UserError(f"unknown target '{name}'", hint="choose one of: " + ", ".join(TARGETS))
        if name not in self.targets:
            raise UserError(f"recipe '{self.name}' has no settings for target '{name}'", hint="add them to the recipe")
        return self.targets[name]

    def eos_ids(self) -> list[int]:
        """Every token id that ends generation (config and generation config)."""
        ids = list(self.generation.eos_token_ids)
        cfg = self.config.get("eos_token_id")
        for value in cfg if isinstance(cfg, list) else [cfg]:
            if isinstance(value, int) and value not in ids:
                ids.append(value)
        return ids


def recipes_dir() -> Path:
    """Folder of the built-in recipes (the project's ``recipes/``, packaged with the wheel)."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("mobile_export") / "recipes"))


def builtin_names() -> list[str]:
    """Names of the built-in recipes, sorted."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe_file(path: Path) -> Recipe:
    """Parse and validate one recipe file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start})", hint="save the recipe as UTF-8") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML", hint="fix the recipe file") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of recipe keys at the top level", hint="fix the recipe file")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}", hint="fix the recipe file") from exc
    if path.parent == recipes_dir() and recipe.name != path.stem:
        raise UserError(f"{path}: key 'name': '{recipe.name}' differs from the file name '{path.stem}'")
    check_schemes(recipe, path)
    return recipe


def check_schemes(recipe: Recipe, path: Path) -> None:
    """Refuse a quantization scheme its backend cannot do, naming the file, the key and the choices
    (the backend registry says what each backend can do)."""
    from mobile_export.backends import get_backend
    from mobile_export.quantize import LINEAR_SCHEMES

    for target, settings in recipe.targets.items():
        entries = [(settings.backend, settings.quant, f"targets.{target}.quant.scheme")]
        entries += [
            (b, q, f"targets.{target}.backend_quant.{b}.scheme") for b, q in (settings.backend_quant or {}).items()
        ]
        for backend_name, quant, key in entries:
            schemes = get_backend(backend_name).schemes
            if quant.scheme in schemes:
                continue
            problem = (
                f"unknown quantization scheme '{quant.scheme}'"
                if quant.scheme not in LINEAR_SCHEMES
                else f"backend '{backend_name}' cannot do quantization '{quant.scheme}'"
            )
            raise UserError(
                f"{path}: key '{key}': {problem}",
                hint=f"fix the recipe file: backend '{backend_name}' can do " + ", ".join(schemes),
            )


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a recipe YAML by path; unknown names suggest close ones."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise UserError(f"recipe file {candidate} does not exist")
        return load_recipe_file(candidate)
    path = recipes_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        names = builtin_names()
        close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.5)
        hint = (
            f"did you mean {' or '.join(repr(c) for c in close)}?"
            if close
            else "run 'mobile-export recipes' to list them"
        )
        raise UserError(f"unknown recipe '{name_or_path}'", hint=hint)
    return load_recipe_file(path)


def all_recipes() -> list[Recipe]:
    """Every built-in recipe, validated."""
    return [load_recipe_file(recipes_dir() / f"{name}.yaml") for name in builtin_names()]


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the recipe's canonical JSON, recorded in bundle manifests."""
    canonical = recipe.model_dump_json(exclude_none=False).encode()
    return hashlib.sha256(canonical).hexdigest()


def recipe_from_model_config(config_dict: dict, name: str) -> Recipe:
    """A recipe for a local model folder given without a recipe: the targets' defaults."""
    default_quant = QuantSettings(scheme="8da4w", group_size=32, embedding="int8")
    targets = {
        "android": TargetSettings(backend="xnnpack", quant=default_quant),
        "ios": TargetSettings(backend="coreml", quant=QuantSettings(scheme="int4", group_size=32, embedding="none")),
    }
    max_pos = config_dict.get("max_position_embeddings")
    length = (
        min(DEFAULT_CONTEXT_LENGTH, max_pos) if isinstance(max_pos, int) and max_pos >= 16 else DEFAULT_CONTEXT_LENGTH
    )
    try:
        return Recipe(
            name=name,
            description="local model folder",
            source="local",
            architecture=str(config_dict.get("model_type")),
            context_length=length,
            config=config_dict,
            targets=targets,
        )
    except ValidationError as exc:
        raise UserError(
            f"cannot use this model folder: {describe_validation_error(exc)}", hint="pass a recipe"
        ) from exc
