"""Paths a bundle's manifest names: plain relative paths that stay inside the bundle folder.

Every path in ``manifest.json`` (``files[].path``, ``artifact.file``/``files``/``compiled``,
``tokenizer.files``) is checked here when the manifest is read, so no command (inspect, run,
verify, eval, the device lab and the phones it pushes to) ever opens a file outside the bundle,
and the artifact and tokenizer are always among the checksummed files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mobile_export.bundle import Manifest

MANIFEST_NAME = "manifest.json"


def covers(name: str, path: str) -> bool:
    """True when ``path`` is ``name`` itself or a file under the folder ``name``."""
    return path == name or path.startswith(name + "/")


def plain_relative_path_problem(value: object) -> str | None:
    """Why ``value`` is not a plain relative posix path inside a folder (None when it is one):
    no absolute paths, drive letters, backslashes, empty, '.' or '..' parts, or control characters."""
    if not isinstance(value, str):
        return f"{value!r} is not a string"
    if not value or any(ord(c) < 32 for c in value):
        return f"{value!r} is empty or has control characters"
    if value.startswith("/") or "\\" in value or (len(value) > 1 and value[1] == ":"):
        return f"{value!r} is not a relative path"
    if any(part in ("", ".", "..") for part in value.split("/")):
        return f"{value!r} has an empty, '.' or '..' part"
    return None


def inside(root: Path, path: Path) -> bool:
    """True when ``path`` (symbolic links followed) lies inside ``root``."""
    return path.resolve().is_relative_to(root.resolve())


def manifest_path_problem(bundle: Path, manifest: Manifest) -> str | None:
    """The first path the manifest names that could reach outside the bundle, or an artifact
    that no checksum covers; None when every path is a plain relative one inside ``bundle``."""
    listed: set[str] = set()
    for index, entry in enumerate(manifest.files):
        problem = plain_relative_path_problem(entry.path)
        if problem is None and entry.path == MANIFEST_NAME:
            problem = f"{entry.path!r} is the manifest itself"
        if problem is None and entry.path in listed:
            problem = f"{entry.path!r} is listed twice"
        if problem is None and not inside(bundle, bundle / entry.path):
            problem = f"{entry.path!r} leads outside the bundle (a symbolic link?)"
        if problem:
            return f"key 'files.{index}.path': {problem}"
        listed.add(entry.path)
    artifact = manifest.artifact
    names: list[tuple[str, object]] = [("artifact.file", artifact.get("file"))]
    extra = artifact.get("files")
    if extra is not None:
        if not isinstance(extra, list):
            return "key 'artifact.files': expected a list of file names"
        names += [(f"artifact.files.{i}", name) for i, name in enumerate(extra)]
    if artifact.get("compiled") is not None:
        names.append(("artifact.compiled", artifact["compiled"]))
    names += [(f"tokenizer.files.{i}", name) for i, name in enumerate(manifest.tokenizer.files)]
    for key, name in names:
        if key == "artifact.file" and name is None:
            return "key 'artifact.file' missing: the manifest must name its artifact"
        problem = plain_relative_path_problem(name)
        if problem:
            return f"key '{key}': {problem}"
        if not any(covers(name, p) for p in listed):
            return f"key '{key}': {name!r} is not one of the bundle's checksummed files"
    return None
