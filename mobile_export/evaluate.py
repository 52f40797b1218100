"""``mobile-export eval``: each bundle's artifact in its own runtime against the original model, on a text.

For every bundle: tokenize the text with the bundle's tokenizer (first ``max_tokens`` tokens), run
the original model eagerly for the reference (cached across bundles of the same model), run the
artifact in its runtime window by window (:mod:`mobile_export.fidelity`), report perplexity,
its ratio to eager, KL divergence and top-1 agreement. A bundle whose runtime cannot run here
(Core ML off macOS) becomes a ``skipped`` row with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mobile_export.bundle import Manifest, read_checked_manifest
from mobile_export.errors import UserError
from mobile_export.fidelity import DEFAULT_WINDOW, FidelityResult, Reference, eager_reference, read_text, text_tokens

DEFAULT_MAX_TOKENS = 1024


@dataclass
class BundleEvaluation:
    """One row of ``eval``: a bundle's figures, or why it was skipped."""

    bundle: Path
    backend: str
    quantization: str
    status: str  # "ok" or "skipped"
    window: int
    reason: str | None = None
    result: FidelityResult | None = None
    reference: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready form (``eval --json``)."""
        return {
            "bundle": str(self.bundle),
            "backend": self.backend,
            "quantization": self.quantization,
            "status": self.status,
            "reason": self.reason,
            "window": self.window,
            "reference": self.reference,
            **(self.result.to_dict() if self.result else {}),
        }


def quant_label(manifest: Manifest) -> str:
    """The bundle's quantization as ``build`` names it, e.g. ``8da4w-g32 hqq + emb int4``."""
    from mobile_export.quantize import QuantSpec

    return QuantSpec.from_manifest(manifest.quantization).label


@dataclass
class ReferenceSource:
    """Where the eager reference model comes from."""

    key: str
    describe: str
    recipe: object
    options: object


def reference_source(bundle: Path, manifest: Manifest, model_path: Path | None, recipe: str | None) -> ReferenceSource:
    """The original model of ``bundle``: ``--model-path``, ``--recipe``, else the manifest's local folder
    (or, for random-weight builds, the recipe's random weights with the build's seed)."""
    from mobile_export.plan import BuildRequest, resolve_recipe
    from mobile_export.recipes import load_recipe
    from mobile_export.sources import SourceOptions

    random = manifest.model.weights == "random"
    seed = int(manifest.build.get("seed") or 0)
    if model_path is None and recipe is None:
        local = Path(manifest.model.path) if manifest.model.path else None
        if local is not None and local.exists():  # a model folder or a GGUF file
            model_path = local
        elif random or manifest.model.weights == "builtin":
            recipe = manifest.recipe.get("name")
        else:
            where = f" (built from {local}, which is not here)" if local else ""
            raise UserError(
                f"no original model for {bundle}{where}",
                hint="pass --model-path DIR (the original Hugging Face folder) or --recipe NAME",
            )
    if model_path is not None:
        resolved = resolve_recipe(BuildRequest(recipe=None, target=manifest.target, model_path=model_path))
        return ReferenceSource(
            key=f"path:{model_path.resolve()}",
            describe=str(model_path),
            recipe=resolved,
            options=SourceOptions(model_path=model_path),
        )
    try:
        loaded = load_recipe(recipe)
    except UserError as exc:
        if recipe == manifest.recipe.get("name"):  # the default: the recipe the bundle was built from
            raise UserError(
                f"no original model for {bundle}: its recipe '{recipe}' is not a built-in one",
                hint="pass --recipe FILE (the recipe it was built from) or --model-path DIR",
            ) from exc
        raise
    if random:
        return ReferenceSource(
            key=f"random:{loaded.name}:{seed}",
            describe=f"{loaded.name} (random weights, seed {seed})",
            recipe=loaded,
            options=SourceOptions(random_weights=True, seed=seed),
        )
    if manifest.model.weights == "builtin":
        return ReferenceSource(
            key=f"builtin:{loaded.name}", describe=f"{loaded.name} (built-in weights)", recipe=loaded, options=SourceOptions()
        )
    return ReferenceSource(
        key=f"hub:{loaded.hf_id}@{manifest.model.revision or loaded.revision}",
        describe=f"{loaded.hf_id}@{manifest.model.revision or loaded.revision}",
        recipe=loaded,
        options=SourceOptions(revision=manifest.model.revision),
    )


def _load_reference(source: ReferenceSource, ids: list[int], window: int) -> Reference:
    from mobile_export.memory import release_memory
    from mobile_export.sources import load_source

    loaded = load_source(source.recipe, source.options)
    vocab = int(loaded.model.config.vocab_size)
    reference = eager_reference(loaded.model, [min(t, vocab - 1) for t in ids], window)
    del loaded
    release_memory()
    return reference


def evaluate_bundles(
    bundles: list[Path],
    text_path: Path,
    *,
    model_path: Path | None = None,
    recipe: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    window: int | None = None,
    on_row=None,
) -> list[BundleEvaluation]:
    """Evaluate every bundle on the text; ``on_row`` is called with each row as it is done."""
    from mobile_export.fidelity import evaluate_runtime
    from mobile_export.run import load_bundle_tokenizer
    from mobile_export.runtimes import open_bundle

    if max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2, not {max_tokens}")
    if window is not None and window < 2:
        raise UserError(f"--window must be at least 2 tokens, not {window}")
    text = read_text(text_path)
    manifests = [(bundle, read_checked_manifest(bundle)) for bundle in bundles]
    if window is None:
        window = min(DEFAULT_WINDOW, *(m.context_length for _, m in manifests))
    too_long = [(b, m) for b, m in manifests if m.context_length < window]
    if too_long:
        bundle, manifest = too_long[0]
        raise UserError(
            f"--window {window} exceeds the context of {bundle} ({manifest.context_length} tokens)",
            hint=f"use --window {manifest.context_length} or less",
        )
    tokens = {}
    for bundle, _ in manifests:
        tokenizer = load_bundle_tokenizer(bundle)
        ids = text_tokens(lambda t, tok=tokenizer: tok(t)["input_ids"], text, max_tokens)
        if len(ids) < window:
            raise UserError(
                f"{text_path} has {len(ids)} tokens, fewer than one window of {window}",
                hint="use a longer text or a smaller --window",
            )
        tokens[bundle] = ids

    references: dict[tuple, Reference] = {}
    rows = []
    for bundle, manifest in manifests:
        row = BundleEvaluation(bundle, manifest.backend, quant_label(manifest), "skipped", window)
        try:
            runtime = open_bundle(bundle, manifest)
        except UserError as exc:
            row.reason = exc.message
            rows.append(row)
            if on_row:
                on_row(row)
            continue
        source = reference_source(bundle, manifest, model_path, recipe)
        key = (source.key, tuple(tokens[bundle]), window)
        if key not in references:
            references[key] = _load_reference(source, tokens[bundle], window)
        row.reference = source.describe
        row.result = evaluate_runtime(runtime, references[key])
        row.status = "ok"
        del runtime
        rows.append(row)
        if on_row:
            on_row(row)
    if not any(r.status == "ok" for r in rows):
        first = rows[0]
        raise UserError(
            f"no bundle could run here; {first.bundle}: {first.reason}",
            hint="run it where its runtime is (Core ML: macOS), or evaluate a bundle of another backend",
        )
    return rows
