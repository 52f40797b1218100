"""Bundles: artifact + tokenizer + ``manifest.json`` (versioned), written atomically, zipped.

Layout of ``dist/<recipe>-<target>[-<backend>]/``::

    model.pte              the artifact (or another backend's files)
    tokenizer.json ...     tokenizer files the runtime needs
    manifest.json          everything an app team needs to wire the model in (schema below)

and ``dist/<recipe>-<target>[-<backend>].zip`` beside it. A bundle is assembled in a hidden
staging folder next to its final place and renamed into place only when complete, so an
interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mobile_export.errors import UserError, describe_validation_error

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


class FileEntry(BaseModel):
    """One file of the bundle with its size and checksum."""

    path: str
    bytes: int
    sha256: str


class TensorSpec(BaseModel):
    """Name, dtype and shape of a program input, output or state (symbolic dims as strings)."""

    name: str
    dtype: str
    shape: list[int | str]


class TokenizerInfo(BaseModel):
    """Tokenizer files and the special token ids the app needs."""

    files: list[str]
    format: str = "huggingface-tokenizers"
    bos_id: int | None = None
    eos_ids: list[int] = Field(default_factory=list)
    pad_id: int | None = None
    add_bos: bool = True
    chat_template: str | None = None  # the template's text (also chat_template.jinja); None: the tokenizer has none
    end_of_turn_ids: list[int] = Field(default_factory=list)  # the template's end-of-turn token (also in eos_ids)

    @field_validator("chat_template", mode="before")
    @classmethod
    def _flag_of_older_builds(cls, value):
        """Earlier builds recorded only whether a template existed (true/false)."""
        return None if isinstance(value, bool) else value


class ModelInfo(BaseModel):
    """Where the weights came from."""

    name: str
    hf_id: str | None = None
    revision: str | None = None
    architecture: str
    license: str = "unknown"
    parameters: int
    weights: str  # "hub", "local" or "random"
    path: str | None = None  # the local folder or GGUF file the weights were loaded from (local builds)
    source_format: str | None = None  # "safetensors", "pickle" or "gguf" (None: random weights)
    gguf: dict | None = None  # GGUF sources: file, sha256, file_type (e.g. Q4_1), tensor types, the reference


class Manifest(BaseModel):
    """``manifest.json``: the contract between a build and the apps/runners that load it."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = MANIFEST_SCHEMA_VERSION
    created_at: str
    tool: dict[str, str]
    versions: dict[str, str]
    model: ModelInfo
    recipe: dict[str, str]
    target: str
    backend: str
    min_os: dict[str, str] = Field(default_factory=dict)
    artifact: dict
    quantization: dict
    context_length: int
    kv_cache_bytes: int | None = None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    states: list[TensorSpec] = Field(default_factory=list)
    tokenizer: TokenizerInfo
    verification: dict = Field(default_factory=dict)
    build: dict = Field(default_factory=dict)
    fidelity: dict | None = None  # the artifact's perplexity ratio, KL and top-1 on a fixed text (fidelity.py)
    files: list[FileEntry] = Field(default_factory=list)

    def artifact_bytes(self) -> int:
        """Bytes of the artifact's files (a folder artifact counts everything under it)."""
        names = self.artifact.get("files") or [self.artifact["file"]]
        return sum(f.bytes for f in self.files if any(f.path == n or f.path.startswith(n + "/") for n in names))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path) -> list[FileEntry]:
    """Every file under ``folder`` except the manifest, sorted, with size and sha256."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME:
            continue
        entries.append(FileEntry(path=rel, bytes=path.stat().st_size, sha256=sha256_file(path)))
    return entries


def tree_bytes(path: Path) -> int:
    """Size of a file, or of every file under a folder (an .mlpackage is a folder)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bundle_name(recipe: str, target: str, backend: str, default_backend: str) -> str:
    """``<recipe>-<target>``, plus ``-<backend>`` when it is not the target's default."""
    name = f"{recipe}-{target}"
    return name if backend == default_backend else f"{name}-{backend}"


def check_destination(final_dir: Path, force: bool) -> None:
    """Refuse to overwrite an existing bundle unless forced."""
    if final_dir.exists() and not force:
        raise UserError(f"output folder {final_dir} already exists", hint="pass --force to replace it")


@contextlib.contextmanager
def staged_bundle(final_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden staging folder; on success it replaces ``final_dir`` atomically.

    On any exception (Ctrl-C included) the staging folder is removed and ``final_dir`` is left
    as it was.
    """
    check_destination(final_dir, force)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        yield staging
        _replace_dir(staging, final_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(staging: Path, final_dir: Path) -> None:
    old = None
    if final_dir.exists():
        old = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}"
        os.replace(final_dir, old)
    os.replace(staging, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Fill in the file list (sizes, sha256) and write ``manifest.json`` into ``folder``."""
    manifest.files = file_entries(folder)
    text = manifest.model_dump_json(indent=2)
    (folder / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")
    return manifest


def write_zip(folder: Path, zip_path: Path) -> Path:
    """Zip ``folder`` (as a top-level folder of the same name) to ``zip_path`` atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{zip_path.name}.tmp-", dir=zip_path.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                archive.write(path, arcname=f"{zip_path.stem}/{path.relative_to(folder).as_posix()}")
        os.replace(tmp, zip_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return zip_path


def read_manifest(bundle: Path) -> Manifest:
    """Load and validate a bundle's manifest; clear errors for missing, newer or broken ones."""
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise UserError(
            f"bundle {bundle} does not exist or is not a folder", hint="pass a folder written by 'mobile-export build'"
        )
    if not path.is_file():
        raise UserError(f"{bundle} has no {MANIFEST_NAME}", hint="pass a folder written by 'mobile-export build'")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}", hint="rebuild the bundle") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(version, int):
        raise UserError(f"{path}: key 'schema_version' missing or not an integer", hint="rebuild the bundle")
    if version > MANIFEST_SCHEMA_VERSION:
        raise UserError(
            f"{path} uses manifest schema {version}; this mobile-export reads up to {MANIFEST_SCHEMA_VERSION}",
            hint="upgrade mobile-export",
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}", hint="rebuild the bundle") from exc


def verify_checksums(bundle: Path, manifest: Manifest) -> list[str]:
    """Problems found re-checking every listed file (missing, size or sha256 mismatch); empty if none."""
    problems = []
    for entry in manifest.files:
        path = bundle / entry.path
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
        elif path.stat().st_size != entry.bytes:
            problems.append(f"{entry.path}: size {path.stat().st_size} != {entry.bytes} in manifest")
        elif sha256_file(path) != entry.sha256:
            problems.append(f"{entry.path}: sha256 mismatch")
    return problems


def checksum_error(bundle: Path, problems: list[str]) -> UserError:
    """The one-line error for a bundle whose files do not match its manifest."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return UserError(
        f"bundle {bundle} failed its checksum check: {problems[0]}{more}", hint="rebuild or re-copy the bundle"
    )


def open_bundle(bundle: Path) -> Manifest:
    """Read a bundle's manifest and refuse it if any file's checksum does not match."""
    manifest = read_manifest(bundle)
    problems = verify_checksums(bundle, manifest)
    if problems:
        raise checksum_error(bundle, problems)
    return manifest
