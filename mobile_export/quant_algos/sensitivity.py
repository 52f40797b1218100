"""Per-layer sensitivity (``mobile-export eval --per-layer``): which layers quantization hurts most.

One layer group at a time (the embedding, each decoder layer's linears, the LM head) is
quantized in eager PyTorch with the bundle's scheme while everything else stays fp32; the
model then runs over the text and the KL divergence of its next-token distributions against
the fp32 model's is that group's cost. Groups are ranked by it, each with what keeping it at
8 bits (``--keep-8bit``) would add to the artifact, so a team can pick the few layers worth
the bytes. (Costs of separate groups roughly add up; they interact a little.)

Calibrated algorithms (gptq, awq) and rotations are not re-run per group: groups are
quantized by round-to-nearest (or HQQ for hqq bundles) and the table says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from mobile_export.errors import UserError
from mobile_export.fidelity import Reference, accumulate_windows, iter_eager_logits
from mobile_export.quantize import (
    CALIBRATED,
    UNQUANTIZED,
    QuantReport,
    QuantSpec,
    extra_bytes_8bit,
    quantize_embedding,
    quantize_module,
)

# torchao's stand-in for each scheme when measured in eager PyTorch
EAGER_SCHEMES = ("8da4w", "int8", "int4")


@dataclass
class GroupSensitivity:
    """The cost of quantizing one layer group alone."""

    group: str
    parameters: int
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    perplexity_ratio: float
    extra_bytes_8bit: int  # what keeping the group at 8 bits would add (0: already 8-bit or not quantized)


@dataclass
class Sensitivity:
    """Ranked groups of one model and scheme on one text."""

    label: str  # the scheme as measured, e.g. "8da4w-g32 hqq + emb int8"
    tokens: int
    window: int
    groups: list[GroupSensitivity]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "scheme": self.label,
            "tokens": self.tokens,
            "window": self.window,
            "notes": self.notes,
            "groups": [
                {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(g).items()} for g in self.groups
            ],
        }


def layer_groups(hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The groups measured: ``embed_tokens``, ``layers.0`` ... ``layers.N-1``, ``lm_head``."""
    base = hf_model.model
    groups: list[tuple[str, nn.Module]] = [("embed_tokens", base.embed_tokens)]
    groups += [(f"layers.{i}", layer) for i, layer in enumerate(base.layers)]
    groups.append(("lm_head", hf_model.lm_head))
    return groups


def _weights(module: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    return [(m, m.weight) for m in module.modules() if isinstance(m, nn.Linear | nn.Embedding)]


def _restore(saved: list[tuple[nn.Module, nn.Parameter]]) -> None:
    for module, weight in saved:
        module.weight = weight
        module.__dict__.pop("extra_repr", None)  # torchao's per-instance repr of the quantized weight


def _quantize_group(name: str, module: nn.Module, spec: QuantSpec) -> int:
    """Quantize one group in place; returns what 8 bits would add for it."""
    report = QuantReport()
    if name == "embed_tokens":
        quantize_embedding(module, spec, report)
        if spec.embedding != "int4":
            return 0
        rows, dim = module.weight.shape
        return rows * dim // 2 + rows * 4 - (rows * dim // spec.group_size) * 4
    holder = nn.ModuleDict({"group": module})  # a parent, so a bare linear (lm_head) can be swapped
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    quantize_module(holder, spec, report)
    if spec.bits >= 8 or not spec.uses_groups:
        return 0
    return sum(extra_bytes_8bit(spec, m) for m in linears if m.in_features % spec.group_size == 0)


def layer_sensitivity(
    hf_model: nn.Module, spec: QuantSpec, reference: Reference, progress: Callable[[str], None] | None = None
) -> list[GroupSensitivity]:
    """Each group's KL cost against ``reference`` (the same model in fp32 on the text), most costly first.

    ``hf_model`` (a transformers causal LM in fp32) is quantized one group at a time and restored.
    """
    if spec.scheme in UNQUANTIZED:
        raise UserError(f"scheme {spec.scheme} quantizes no layer; nothing to rank", hint="pass a quantized bundle")
    hf_model.float().eval()
    results = []
    for name, module in layer_groups(hf_model):
        if name == "embed_tokens" and spec.embedding == "none":
            continue
        if progress:
            progress(name)
        saved = _weights(module)
        parameters = sum(w.numel() for _, w in saved)
        extra = _quantize_group(name, module, spec)
        acc = accumulate_windows(iter_eager_logits(hf_model, reference.token_ids, reference.window), reference)
        _restore(saved)
        result = acc.result()
        results.append(
            GroupSensitivity(
                group=name,
                parameters=parameters,
                kl_mean=result.kl_mean,
                kl_p99=result.kl_p99,
                top1_agreement=result.top1_agreement,
                perplexity_ratio=result.perplexity_ratio,
                extra_bytes_8bit=extra,
            )
        )
    return sorted(results, key=lambda g: g.kl_mean, reverse=True)


def spec_for_bundle(quantization: dict, backend: str) -> tuple[QuantSpec, list[str]]:
    """The eager stand-in of a bundle's quantization, and notes on what differs."""
    scheme = str(quantization.get("scheme"))
    notes = []
    if scheme in UNQUANTIZED:
        raise UserError(
            f"the bundle is {scheme}: no layer is quantized, nothing to rank", hint="pass a quantized bundle"
        )
    if scheme not in EAGER_SCHEMES:
        raise UserError(
            f"per-layer sensitivity has no eager stand-in for scheme {scheme}",
            hint="rank a bundle built with 8da4w, int4 or int8",
        )
    recorded = QuantSpec.from_manifest(quantization)
    algo = recorded.algo
    if algo in CALIBRATED:
        notes.append(f"groups quantized by round-to-nearest (the bundle used {algo}, which needs the whole model)")
        algo = "rtn"
    if recorded.rotate:
        notes.append("without the bundle's rotation")
    from mobile_export.backends import backend_class

    backend_cls = backend_class(str(backend))
    exact = backend_cls is not None and backend_cls.exact_eager_stand_in
    if not exact:
        notes.append(f"{backend}'s weights stood in for by torchao's weight-only {scheme}")
    # Each group is ranked against the bundle's other layers at its own scheme: the bundle's
    # 8-bit keeps and per-pattern group sizes are what the ranking is there to choose.
    spec = replace(
        recorded,
        weight_only=not exact,
        algo=algo,
        rotate=False,
        keep_8bit=(),
        group_sizes=(),
        embedding_group_size=recorded.embedding_group_size if exact else None,
    )
    return spec, notes


def bundles_sensitivity(
    bundles: list[Path],
    text_path: Path,
    *,
    model_path: Path | None = None,
    recipe: str | None = None,
    max_tokens: int,
    window: int,
    progress: Callable[[str], None] | None = None,
) -> dict[Path, Sensitivity]:
    """Per-layer sensitivity for each bundle's scheme, on its original model (the one ``eval`` compares with)."""
    from mobile_export.bundle import read_checked_manifest
    from mobile_export.evaluate import reference_source
    from mobile_export.fidelity import eager_reference, read_text, text_tokens
    from mobile_export.memory import release_memory
    from mobile_export.run import load_bundle_tokenizer
    from mobile_export.sources import load_source

    text = read_text(text_path)
    out: dict[Path, Sensitivity] = {}
    for bundle in bundles:
        manifest = read_checked_manifest(bundle)
        spec, notes = spec_for_bundle(manifest.quantization, manifest.backend)
        tokenizer = load_bundle_tokenizer(bundle)
        source = reference_source(bundle, manifest, model_path, recipe)
        loaded = load_source(source.recipe, source.options)
        vocab = int(loaded.model.config.vocab_size)
        ids = [min(t, vocab - 1) for t in text_tokens(lambda t, tok=tokenizer: tok(t)["input_ids"], text, max_tokens)]
        model = loaded.model.float().eval()
        reference = eager_reference(model, ids, window)
        groups = layer_sensitivity(model, spec, reference, progress)
        out[bundle] = Sensitivity(
            label=spec.label, tokens=len(reference.targets), window=window, groups=groups, notes=notes
        )
        del loaded, model
        release_memory()
    return out


def print_sensitivity(results: dict[Path, Sensitivity]) -> None:
    """One table per bundle on the terminal (160 columns when not a terminal, like the other tables)."""
    import sys

    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    for bundle, result in results.items():
        console.print(sensitivity_table(bundle, result))


def sensitivity_table(bundle: Path, result: Sensitivity):
    """A rich table: groups ranked by the KL divergence they add."""
    from rich.table import Table

    title = f"Per-layer sensitivity of {bundle.name}: {result.label}, one group quantized at a time ({result.tokens} tokens)"
    table = Table(title=title, title_justify="left", caption="; ".join(result.notes) or None)
    for column in ("rank", "group", "params", "KL mean", "KL p99", "top-1", "ppl ratio", "8-bit costs"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for rank, g in enumerate(result.groups, start=1):
        table.add_row(
            str(rank),
            g.group,
            f"{g.parameters / 1e6:.3g}M",
            f"{g.kl_mean:.4g}",
            f"{g.kl_p99:.4g}",
            f"{g.top1_agreement:.1%}",
            f"{g.perplexity_ratio:.4f}",
            f"+{g.extra_bytes_8bit / 1e6:.3g} MB" if g.extra_bytes_8bit else "-",
        )
    return table
