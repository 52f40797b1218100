"""The bundles a plan tests: opened and checksum-verified (or built first), and their prompts.

Prompts are token ids, made once on the host from the bundle's own tokenizer and the project's
fixed text, so every harness on every device feeds exactly the same tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mobile_export.bundle import MANIFEST_NAME, Manifest, checksum_error, read_manifest, verify_checksums
from mobile_export.errors import UserError

from .plan import BundlePath, BundleRecipe, Plan

FIXED_TEXT = Path(__file__).resolve().parent.parent / "assets" / "text" / "fixed_eval.txt"


@dataclass
class BenchBundle:
    """A verified bundle ready to be measured."""

    name: str
    path: Path
    manifest: Manifest
    manifest_sha256: str
    prompts: dict[int, Path] = field(default_factory=dict)  # prompt length → prompt file

    @property
    def bundle_bytes(self) -> int:
        """Size of every file in the bundle (manifest excluded)."""
        return sum(entry.bytes for entry in self.manifest.files)

    @property
    def artifact_bytes(self) -> int:
        """Size of the model artifact."""
        return self.manifest.artifact_bytes()

    def describe(self) -> dict:
        """The bundle part of a results record."""
        quant = self.manifest.quantization
        return {
            "name": self.name,
            "path": str(self.path),
            "manifest_sha256": self.manifest_sha256,
            "model": self.manifest.model.name,
            "architecture": self.manifest.model.architecture,
            "parameters": self.manifest.model.parameters,
            "target": self.manifest.target,
            "backend": self.manifest.backend,
            "quantization": {k: quant.get(k) for k in ("scheme", "group_size", "embedding", "bits_per_weight")},
            "context_length": self.manifest.context_length,
            "bundle_bytes": self.bundle_bytes,
            "artifact_bytes": self.artifact_bytes,
        }


def open_bench_bundle(path: Path, name: str | None = None) -> BenchBundle:
    """Open a bundle folder, refusing it when missing or when any checksum does not match."""
    if not path.exists():
        raise UserError(
            f"bundle {path} does not exist (relative paths are read from {Path.cwd()})",
            hint="build it with 'mobile-export build', or fix the plan's bundle path",
        )
    manifest = read_manifest(path)
    problems = verify_checksums(path, manifest)
    if problems:
        raise checksum_error(path, problems)
    sha = hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest()
    return BenchBundle(name=name or path.name, path=path, manifest=manifest, manifest_sha256=sha)


def resolve_bundles(plan: Plan, ui=None) -> list[BenchBundle]:
    """Every bundle of the plan: existing folders opened, recipes built first when needed."""
    bundles: list[BenchBundle] = []
    for spec in plan.bundles:
        if isinstance(spec, BundlePath):
            bundles.append(open_bench_bundle(Path(spec.path), spec.name))
        else:
            bundles.append(_built_bundle(spec, Path(plan.build_dir), ui))
    names = [b.name for b in bundles]
    for bundle_name in names:
        if names.count(bundle_name) > 1:
            raise UserError(f"two bundles of the plan are both named '{bundle_name}'", hint="give one of them a 'name'")
    return bundles


def _built_bundle(spec: BundleRecipe, build_dir: Path, ui) -> BenchBundle:
    """Build the recipe into ``build_dir`` unless a matching bundle is already there; the build
    plan is resolved (and checked) once, as ``mobile-export build`` does, before either."""
    from mobile_export.build import build_plan
    from mobile_export.console import StepUI
    from mobile_export.plan import BuildRequest, resolve_plan
    from mobile_export.recipes import load_recipe

    recipe = load_recipe(spec.recipe)
    request = BuildRequest(
        recipe=spec.recipe,
        target=spec.target,
        backend=spec.backend,
        quant=spec.quant,
        group_size=spec.group_size,
        embedding_quant=spec.embedding_quant,
        context_length=spec.context_length,
        random_weights=spec.random_weights,
        seed=spec.seed,
        output_dir=build_dir,
    )
    plan = resolve_plan(request, recipe)  # unknown backends, bad schemes fail here, before a long build
    folder = plan.bundle_dir
    if folder.exists():
        existing = open_bench_bundle(folder, spec.name)
        mismatch = _mismatch(existing.manifest, spec, recipe)
        if mismatch:
            raise UserError(
                f"{folder} exists but was built with {mismatch}",
                hint="delete it, or set the plan's build_dir to another folder",
            )
        return existing
    result = build_plan(plan, ui or StepUI(quiet=True))
    return open_bench_bundle(result.bundle, spec.name)


def _mismatch(manifest: Manifest, spec: BundleRecipe, recipe) -> str | None:
    """What differs between an existing bundle and the one the plan asks to build (None: same).

    The recipe's name and everything the plan sets explicitly must match; a bundle built from an
    earlier edit of the same recipe is reused (delete it to rebuild).
    """
    if manifest.recipe.get("name") != recipe.name:
        return f"recipe '{manifest.recipe.get('name')}' (the plan asks for '{recipe.name}')"
    wanted = {
        "target": (spec.target, manifest.target),
        "quantization scheme": (spec.quant, manifest.quantization.get("scheme")),
        "group size": (spec.group_size, manifest.quantization.get("group_size")),
        "embedding quantization": (spec.embedding_quant, manifest.quantization.get("embedding")),
        "context length": (spec.context_length, manifest.context_length),
        "backend": (spec.backend, manifest.backend),
    }
    for label, (asked, built) in wanted.items():
        if asked is not None and asked != built:
            return f"{label} {built} (the plan asks for {asked})"
    return None


def prompt_ids(bundle: BenchBundle, length: int) -> list[int]:
    """Exactly ``length`` token ids: the bundle tokenizer's encoding of the fixed text, repeated."""
    text = FIXED_TEXT.read_text(encoding="utf-8")
    ids = _encode(bundle, text)
    if not ids:
        raise UserError(f"the tokenizer of {bundle.path} encodes the fixed text to no tokens")
    bos = bundle.manifest.tokenizer.bos_id
    body = [t for t in ids if t != bos] or ids
    prefix = [bos] if bundle.manifest.tokenizer.add_bos and bos is not None else []
    out = list(prefix)
    while len(out) < length:
        out.extend(body)
    return out[:length]


def _encode(bundle: BenchBundle, text: str) -> list[int]:
    tokenizer_json = bundle.path / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids
    from mobile_export.run import load_bundle_tokenizer

    return list(load_bundle_tokenizer(bundle.path)(text, add_special_tokens=False)["input_ids"])


def write_prompts(bundle: BenchBundle, lengths: set[int], folder: Path) -> None:
    """Write one prompt file per length into ``folder`` and remember them on ``bundle``."""
    folder.mkdir(parents=True, exist_ok=True)
    for length in sorted(lengths):
        path = folder / f"prompt-{length}.json"
        ids = prompt_ids(bundle, length)
        path.write_text(json.dumps({"token_ids": ids}) + "\n", encoding="utf-8")
        bundle.prompts[length] = path


def check_context(bundle: BenchBundle, plan: Plan) -> None:
    """Refuse scenarios that do not fit the bundle's KV cache."""
    for scenario in plan.scenarios:
        needed = scenario.prompt_tokens + scenario.new_tokens
        if needed > bundle.manifest.context_length:
            raise UserError(
                f"scenario '{scenario.name}' needs {needed} tokens; bundle {bundle.name} holds "
                f"{bundle.manifest.context_length}",
                hint="shorten the scenario or build the bundle with a larger --context-length",
            )
