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

from mobile_export.bundle_paths import MANIFEST_NAME, covers, inside, manifest_path_problem
from mobile_export.errors import UserError, describe_validation_error

MANIFEST_SCHEMA_VERSION = 1


class FileEntry(BaseModel):
    """One file of the bundle with its size and checksum."""

    path: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


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
    weights: str  # "hub", "local", "builtin" or "random"
    path: str | None = None  # the local folder or GGUF file the weights were loaded from (local builds)
    source_format: str | None = None  # "safetensors", "pickle" or "gguf" (None: random or built-in weights)
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
        return sum(f.bytes for f in self.files if any(covers(n, f.path) for n in names))

    def vocab_size(self) -> int | None:
        """The model's vocabulary size: the runner metadata's, else the logits output's last dim."""
        meta = self.artifact.get("metadata")
        value = meta.get("get_vocab_size") if isinstance(meta, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        for spec in self.outputs:
            if spec.name == "logits" and spec.shape and isinstance(spec.shape[-1], int) and spec.shape[-1] > 0:
                return spec.shape[-1]
        return None


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
    """Refuse to overwrite an existing bundle unless forced, and refuse a destination that cannot
    be written (a file where a folder is needed, no write permission) before any work starts."""
    if final_dir.is_symlink() or (final_dir.exists() and not final_dir.is_dir()):
        raise UserError(f"output {final_dir} exists and is not a folder", hint="remove it or pick another -o")
    if final_dir.exists() and not force:
        raise UserError(f"output folder {final_dir} already exists", hint="pass --force to replace it")
    parent = final_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"output folder {final_dir.parent}: {parent} is a file", hint="pick another -o")
    try:  # a real probe: permission bits say little to root, or on read-only and virtual file systems
        fd, probe = tempfile.mkstemp(prefix=".mobile-export-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(
            f"output folder {final_dir.parent}: cannot write in {parent} ({exc.strerror})", hint="pick another -o"
        ) from exc


def _umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_modes(folder: Path) -> None:
    """Give ``folder`` and everything under it the modes of ordinary files and folders under
    the user's umask (0755/0644 with the usual 022) instead of the private ones of temporary files."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            Path(root, name).chmod(0o777 & ~mask)
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(0o666 & ~mask)


@contextlib.contextmanager
def staged_bundle(final_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden staging folder; on success it replaces ``final_dir`` atomically.

    On any exception (Ctrl-C included) the staging folder is removed and ``final_dir`` is left
    as it was.
    """
    check_destination(final_dir, force)
    try:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    except OSError as exc:
        raise UserError(f"cannot create {final_dir}: {exc.strerror}", hint="pick another -o") from exc
    try:
        yield staging
        normalize_modes(staging)
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
    normalize_modes(folder)  # the members keep their on-disk modes
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                archive.write(path, arcname=f"{zip_path.stem}/{path.relative_to(folder).as_posix()}")
        Path(tmp).chmod(0o666 & ~_umask())
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
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}", hint="rebuild the bundle") from exc
    problem = manifest_path_problem(bundle, manifest)
    if problem:
        raise UserError(f"{path}: {problem}", hint="a bundle may only name its own files; rebuild the bundle")
    return manifest


def verify_checksums(bundle: Path, manifest: Manifest) -> list[str]:
    """Problems found re-checking every listed file (missing, size or sha256 mismatch); empty if none."""
    problems = []
    for entry in manifest.files:
        path = bundle / entry.path
        if path.is_symlink() and not inside(bundle, path):
            problems.append(f"{entry.path}: a link that leads outside the bundle")
        elif not path.is_file():
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


def read_checked_manifest(bundle: Path) -> Manifest:
    """Read a bundle's manifest and refuse it if any file's checksum does not match."""
    manifest = read_manifest(bundle)
    problems = verify_checksums(bundle, manifest)
    if problems:
        raise checksum_error(bundle, problems)
    return manifest


def load_tokenizer(bundle: Path, manifest: Manifest | None = None):
    """The bundle's tokenizer, loaded from a private copy of exactly the checksummed files the
    manifest lists under ``tokenizer.files``, with remote code refused: nothing else in the
    folder (model code, links, stray files) is ever read, and transformers never prompts."""
    import transformers

    manifest = manifest or read_manifest(bundle)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="mobile-export-tokenizer-") as tmp:
        for name in manifest.tokenizer.files:
            if not (bundle / name).is_file():
                raise UserError(f"{bundle}: tokenizer file {name} is missing or not a file", hint="rebuild the bundle")
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle / name, target)
        try:
            return transformers.AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
        except Exception as exc:  # missing, unreadable or code-requiring tokenizer files
            if "trust_remote_code" in str(exc):
                raise UserError(
                    f"the tokenizer in {bundle} asks to run its own Python code (auto_map); bundles never run code",
                    hint="rebuild the bundle with a tokenizer that needs no custom code",
                ) from exc
            raise UserError(f"cannot load the tokenizer in {bundle}: {exc}", hint="rebuild the bundle") from exc
