"""Runtimes that load a bundle's artifact and step it: prefill, decode, logits.

One interface, :class:`~mobile_export.runtimes.base.Runtime`; one loader per artifact format;
and :func:`open_bundle`, which picks the loader by the manifest's ``artifact.format``. The run
side (``run``, ``verify``, ``eval``, the host harness) opens bundles only through here, and
nothing here imports the export side (:mod:`mobile_export.backends`).
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

from mobile_export.errors import UserError
from mobile_export.runtimes.base import Runtime

# artifact format (the manifest's artifact.format) -> module and class of its loader, imported on use
LOADERS: dict[str, tuple[str, str]] = {
    "executorch-pte": ("mobile_export.runtimes.executorch", "ExecuTorchRuntime"),
    "coreml-mlpackage": ("mobile_export.runtimes.coreml", "CoreMLRuntime"),
    "onnxruntime-genai": ("mobile_export.runtimes.onnx", "OnnxRuntime"),
}
# the format of a manifest that names none, by its artifact's suffix
_SUFFIX_FORMATS = {".pte": "executorch-pte", ".mlpackage": "coreml-mlpackage", ".onnx": "onnxruntime-genai"}

__all__ = ["LOADERS", "Runtime", "artifact_format", "loader", "open_artifact", "open_bundle"]


def artifact_format(artifact: dict) -> str:
    """The format of a manifest's ``artifact`` entry (from its file's suffix when it names none)."""
    value = artifact.get("format")
    if isinstance(value, str) and value:
        return value
    return _SUFFIX_FORMATS.get(Path(str(artifact.get("file", ""))).suffix, "")


def loader(fmt: str) -> type[Runtime]:
    """The runtime class that opens artifacts of format ``fmt``; unknown formats list the known ones."""
    if fmt not in LOADERS:
        known = sorted(LOADERS)
        close = difflib.get_close_matches(fmt, known, n=1)
        raise UserError(
            f"unknown artifact format '{fmt}': this mobile-export cannot run it",
            hint="it runs: " + ", ".join(known) + (f"; did you mean '{close[0]}'?" if close else ""),
        )
    module, name = LOADERS[fmt]
    cls = getattr(importlib.import_module(module), name)
    if cls.format != fmt:
        raise ValueError(f"{module}.{name} opens '{cls.format}', not '{fmt}'")
    return cls


def open_artifact(path: Path, artifact: dict) -> Runtime:
    """Open the artifact file or folder at ``path``, described by a manifest's ``artifact`` entry."""
    return loader(artifact_format(artifact)).open(path, artifact)


def open_bundle(bundle_dir: Path, manifest=None) -> Runtime:
    """Open a bundle's artifact in its runtime; ``manifest`` is read (checksums checked) when not given."""
    if manifest is None:
        from mobile_export.bundle import read_checked_manifest as checked_manifest

        manifest = checked_manifest(bundle_dir)
    return open_artifact(Path(bundle_dir) / manifest.artifact["file"], manifest.artifact)
