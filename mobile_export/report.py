"""Tables and summaries for the terminal (rich), kept apart from the logic that makes them."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mobile_export.bundle import Manifest
from mobile_export.recipes import Recipe

_out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


def print_recipe_table(recipes: list[Recipe]) -> None:
    """One row per recipe: model, size of context, per-target defaults."""
    table = Table(title="Recipes", title_justify="left")
    for column in ("name", "hugging face id", "arch", "context", "android", "ios"):
        table.add_column(column)
    for recipe in recipes:
        cells = []
        for target in ("android", "ios"):
            settings = recipe.targets.get(target)
            cells.append(f"{settings.backend} {settings.quant.scheme}" if settings else "-")
        table.add_row(
            recipe.name,
            recipe.hf_id or "(built-in, no download)",
            recipe.architecture,
            str(recipe.context_length),
            *cells,
        )
    _out.print(table)


def print_recipe(recipe: Recipe) -> None:
    """The recipe as YAML."""
    import yaml

    _out.print(yaml.safe_dump(recipe.model_dump(), sort_keys=False).rstrip(), markup=False)


def print_manifest(bundle: Path, manifest: Manifest, problems: list[str]) -> None:
    """Summary of a bundle and the result of re-checking its files."""
    model = manifest.model
    quant = manifest.quantization
    _out.print(f"[bold]{bundle}[/bold]  (manifest schema {manifest.schema_version})")
    _out.print(
        f"  model       {model.name} ({model.architecture}, {model.parameters / 1e6:.1f}M params, {model.weights} weights)"
    )
    if model.hf_id:
        _out.print(f"  source      {model.hf_id}@{model.revision}")
    elif model.gguf:
        _out.print(f"  source      {escape(model.gguf['file'])} (GGUF, {model.gguf.get('file_type')}; dequantized)")
    _out.print(f"  target      {manifest.target} / {manifest.backend} ({manifest.artifact.get('format')})")
    _out.print(
        f"  quant       {quant.get('scheme')} (group {quant.get('group_size')}), embedding {quant.get('embedding')}, {quant.get('bits_per_weight')} bits/weight"
    )
    _out.print(f"  context     {manifest.context_length} tokens")
    tok = manifest.tokenizer
    chat = ", chat template" if tok.chat_template else ""
    _out.print(f"  tokenizer   {', '.join(tok.files)} (bos {tok.bos_id}, eos {tok.eos_ids}{chat})")
    for comparison in manifest.verification.get("comparisons", []):
        state = "ok" if comparison["passed"] else ("FAILED" if comparison["enforced"] else "not enforced")
        if "min_cosine" in comparison:  # logits compared position by position
            figures = f"cos {comparison['min_cosine']:.6f}"
        else:  # judged on the fidelity text (verify.quality_check)
            figures = f"perplexity x{comparison['perplexity_ratio']:.3f}, KL mean {comparison['kl_mean']:.3g}"
        _out.print(
            f"  verified    {escape(comparison['name'])}: {figures}, "
            f"top-1 {comparison['top1_agreement']:.0%} \\[{state}]"
        )
    if manifest.fidelity:
        from mobile_export.fidelity import fidelity_summary

        _out.print(f"  fidelity    {escape(fidelity_summary(manifest.fidelity))}")
    total = sum(entry.bytes for entry in manifest.files)
    _out.print(f"  files       {len(manifest.files)} files, {_mb(total)}")
    if problems:
        for problem in problems:
            _out.print(f"  [red]✗ {escape(problem)}[/red]")
    else:
        _out.print("  [green]✓ all checksums match[/green]")


def print_build_summary(result) -> None:
    """What was written, its size, bits per weight, parity figures and time."""
    manifest = result.manifest
    name = manifest.artifact["file"]
    size = manifest.artifact_bytes()
    _out.print(f"[bold green]Built[/bold green] {result.bundle}  [dim]({result.seconds:.1f}s)[/dim]")
    _out.print(f"  artifact    {name}: {_mb(size)}, {manifest.quantization['bits_per_weight']} bits/weight")
    _out.print(f"  zip         {result.zip_path}: {_mb(result.zip_path.stat().st_size)}")
    for comparison in result.comparisons:
        _out.print(f"  parity      {comparison.summary()}")
    if manifest.fidelity:
        from mobile_export.fidelity import fidelity_summary

        _out.print(f"  fidelity    {escape(fidelity_summary(manifest.fidelity))}")


def print_run_stats(stats, load_seconds: float) -> None:
    """Load time, time to first token and tokens/s of one generation (to stderr)."""
    _err.print(
        f"[dim]load {load_seconds * 1000:.0f} ms · prompt {stats.prompt_tokens} tok · "
        f"first token {stats.time_to_first_token * 1000:.0f} ms · prefill {stats.prefill_tokens_per_second:.1f} tok/s · "
        f"decode {stats.decode_tokens_per_second:.1f} tok/s ({stats.generated_tokens} tokens)[/dim]"
    )


def print_eval_table(rows, text_name: str) -> None:
    """``eval``: one row per bundle (perplexity, ratio to eager, KL mean and p99, top-1, tokens, time)."""
    table = Table(title=f"Fidelity on {text_name} (artifact in its runtime vs the original model, eager)")
    for column in ("bundle", "backend", "quant", "ppl", "eager ppl", "ratio", "KL mean", "KL p99", "top-1", "tokens"):
        table.add_column(column, justify="left" if column in ("bundle", "backend", "quant") else "right")
    table.add_column("time", justify="right")
    for row in rows:
        cells = [escape(row.bundle.name), row.backend, row.quantization]
        if row.result is None:
            table.add_row(*cells, f"[yellow]skipped: {escape(row.reason or '')}[/yellow]", *[""] * 7)
            continue
        r = row.result
        table.add_row(
            *cells,
            f"{r.perplexity:.4g}",
            f"{r.reference_perplexity:.4g}",
            f"{r.perplexity_ratio:.4f}",
            f"{r.kl_mean:.4g}",
            f"{r.kl_p99:.4g}",
            f"{r.top1_agreement:.1%}",
            str(r.tokens),
            f"{r.seconds:.1f}s",
        )
    _out.print(table)


def print_parity_report(bundle: Path, report, facts: dict) -> None:
    """``verify``: the artifact against the bundle's reference.json, one line per prompt."""
    _out.print(
        f"[bold]{escape(str(bundle))}[/bold]: {facts['backend']} {facts['quantization']}, "
        f"{facts['weights']} weights; reference.json thresholds {report.thresholds}"
    )
    for p in report.prompts:
        state = "[green]ok[/green]" if p.passed else ("[red]FAILED[/red]" if report.enforced else "not enforced")
        diffs = (
            f", |log-prob diff| max {p.max_abs_logprob_diff:.3g} mean {p.mean_abs_logprob_diff:.3g}"
            if p.max_abs_logprob_diff is not None
            else ""
        )
        mismatch = "" if p.first_mismatch is None else f", first mismatch at step {p.first_mismatch}"
        failures = f" ({escape('; '.join(p.failures))})" if p.failures else ""
        _out.print(
            f"  prompt {p.prompt}: greedy agreement {p.top1_agreement:.0%} of {p.steps} steps{diffs}{mismatch} "
            f"{state}{failures}"
        )
    if not report.enforced:
        _out.print("  [dim]random weights, quantized: figures recorded, not enforced[/dim]")
