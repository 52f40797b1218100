"""Backends: one module each, registered by name with :func:`register`.

A backend turns an :class:`~mobile_export.modeling.ExportableDecoder` into an artifact file
and opens that artifact again for verification and ``run``. Every backend declares the
targets and quantization schemes it accepts, so a bad combination is refused before any
heavy work starts.
"""

from __future__ import annotations

import difflib
import importlib
from abc import ABC, abstractmethod
from pathlib import Path

from mobile_export.errors import UserError

_REGISTRY: dict[str, type[Backend]] = {}
# Modules that register backends; imported on first lookup so `--help` stays fast.
_BACKEND_MODULES = ("mobile_export.targets.xnnpack",)


class Backend(ABC):
    """What a backend provides to the build pipeline."""

    name: str = ""
    targets: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    artifact_file: str = ""
    artifact_format: str = ""
    default_quant = None  # QuantSettings used when a recipe names another backend for the target

    def check(self, target: str, scheme: str) -> None:
        """Refuse a target or scheme this backend cannot do, listing what it can."""
        if target not in self.targets:
            raise UserError(
                f"backend '{self.name}' cannot build for target '{target}'",
                hint="it builds for: " + ", ".join(self.targets),
            )
        if scheme not in self.schemes:
            raise UserError(
                f"backend '{self.name}' cannot do quantization '{scheme}'",
                hint="it can do: " + ", ".join(self.schemes),
            )

    @abstractmethod
    def export(self, model, metadata: dict, out_dir: Path, ui) -> dict:
        """Write the artifact into ``out_dir``; return facts for the manifest."""

    @abstractmethod
    def open(self, artifact: Path):
        """Load the artifact for stepping (an object with ``step(tokens, start_pos)``)."""


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add a backend to the registry (duplicate names are an error)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"backend '{cls.name}' registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in _BACKEND_MODULES:
        importlib.import_module(module)


def available() -> list[str]:
    """Names of the registered backends."""
    _load_all()
    return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    """A backend by name; unknown names list the known ones and suggest a close match."""
    _load_all()
    if name not in _REGISTRY:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, known, n=1)
        hint = "available: " + ", ".join(known) + (f"; did you mean '{close[0]}'?" if close else "")
        raise UserError(f"unknown or unavailable backend '{name}'", hint=hint)
    return _REGISTRY[name]()
