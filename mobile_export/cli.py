"""Command line: parse, call, print. The work happens in the modules these commands call."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mobile_export import __version__
from mobile_export.errors import UserError


class _Cli(click.Group):
    """Turns user errors into one line on stderr and a non-zero exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc.one_line()}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            ctx.exit(130)


@click.group(cls=_Cli)
@click.version_option(__version__, prog_name="mobile-export")
def main() -> None:
    """Export small language models to verified mobile bundles and run them."""
    import logging
    import warnings

    # Library chatter that says nothing to a user of this tool (deprecation notes on import).
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@main.command()
@click.argument("recipe", required=False)
@click.option("--target", "-t", required=True, help="Platform: android or ios.")
@click.option("--backend", help="Backend (default from the recipe): xnnpack, coreml or coreml-executorch.")
@click.option(
    "--quant",
    help="Weight quantization (default from the recipe): xnnpack fp32|8da4w|int8; "
    "coreml fp16|int4|int8|palettize4|palettize6; coreml-executorch fp32|int4|int8.",
)
@click.option("--group-size", type=int, help="Group (block) size for 8da4w, int4 and int4 embeddings: 32, 64 or 128.")
@click.option("--embedding-quant", help="Embedding quantization: none, int8 or int4.")
@click.option("--context-length", type=int, help="Tokens the KV cache holds (default from the recipe).")
@click.option("--model-path", type=click.Path(path_type=Path), help="Local Hugging Face model folder.")
@click.option("--random-weights", is_flag=True, help="Random weights of the recipe's architecture (tests, benchmarks).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-weights.")
@click.option("--revision", help="Hub revision instead of the recipe's pinned one.")
@click.option("--output-dir", "-o", type=click.Path(path_type=Path), default=Path("dist"), show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) checkpoints. Only for files you trust.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder. Only if you trust it.")
@click.option("--keep-unverified", is_flag=True, help="Write the bundle even if verification fails.")
@click.option("--compute-units", help="Core ML compute units: all, cpu_only, cpu_and_gpu or cpu_and_ne.")
@click.option("--min-ios", help="Core ML minimum deployment target, e.g. 18 (states need iOS 18).")
@click.option("--compile-mlmodelc", is_flag=True, help="Core ML: also write the compiled .mlmodelc (macOS with Xcode).")
@click.option("--kv-budget-mb", type=float, help="Refuse a build whose KV cache would exceed this many MB.")
@click.option("--quiet", "-q", is_flag=True, help="Only print the summary.")
def build(recipe: str | None, target: str, quiet: bool, **options) -> None:
    """Build a verified bundle from RECIPE (or --model-path) for --target."""
    from mobile_export.build import BuildRequest
    from mobile_export.build import build as run_build
    from mobile_export.console import StepUI
    from mobile_export.report import print_build_summary

    request = BuildRequest(recipe=recipe, target=target, **options)
    result = run_build(request, StepUI(quiet=quiet))
    print_build_summary(result)


@main.group(cls=_Cli, invoke_without_command=True)
@click.pass_context
def recipes(ctx: click.Context) -> None:
    """List the built-in recipes."""
    if ctx.invoked_subcommand is None:
        from mobile_export.recipes import all_recipes
        from mobile_export.report import print_recipe_table

        print_recipe_table(all_recipes())


@recipes.command("show")
@click.argument("name")
def recipes_show(name: str) -> None:
    """Print one recipe (NAME or a path to a recipe YAML)."""
    from mobile_export.recipes import load_recipe
    from mobile_export.report import print_recipe

    print_recipe(load_recipe(name))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def inspect(bundle: Path) -> None:
    """Print a bundle's manifest summary and re-check every file's checksum."""
    from mobile_export.bundle import checksum_error, read_manifest, verify_checksums
    from mobile_export.report import print_manifest

    manifest = read_manifest(bundle)
    problems = verify_checksums(bundle, manifest)
    print_manifest(bundle, manifest, problems)
    if problems:
        raise checksum_error(bundle, problems)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", required=True, help="Text to continue.")
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True)
def run(bundle: Path, prompt: str, max_new_tokens: int) -> None:
    """Generate text from PROMPT with BUNDLE's artifact on this machine, streaming it."""
    from mobile_export.run import run_bundle

    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    run_bundle(bundle, prompt, max_new_tokens, out=sys.stdout)


# --- device lab: bench and report -------------------------------------------------------------

EXIT_MEASUREMENTS_FAILED = 5  # bench: results written, but some measurements failed
EXIT_REGRESSION = 4  # report: written, and a metric regressed beyond the plan's threshold


@main.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path), required=True, help="Results folder.")
@click.option("--device", "-d", "devices", multiple=True, help="Only this plan device (repeatable).")
@click.option("--quiet", "-q", is_flag=True, help="No progress; only the summary.")
def bench(plan: Path, out_dir: Path, devices: tuple[str, ...], quiet: bool) -> None:
    """Run benchmark PLAN (bundles x devices x scenarios) into OUT/results.jsonl.

    Each measurement is appended as it is taken; rerunning resumes, skipping what is measured.
    Exit status 5 when some measurements failed (they are recorded with their reasons).
    """
    from mobile_export.console import StepUI
    from mobile_export.devicelab.plan import load_plan
    from mobile_export.devicelab.progress import BenchProgress, print_summary
    from mobile_export.devicelab.report import group_results
    from mobile_export.devicelab.runner import run_plan

    loaded, sha = load_plan(plan)
    progress = BenchProgress(quiet=quiet)
    try:
        summary = run_plan(
            loaded, sha, out_dir, device_names=list(devices), progress=progress, build_ui=StepUI(quiet=quiet)
        )
    except KeyboardInterrupt:
        click.echo(
            f"interrupted: measurements taken so far are in {out_dir / 'results.jsonl'}; rerun to resume", err=True
        )
        sys.exit(130)
    print_summary(summary, group_results(summary.records))
    if summary.failed:
        sys.exit(EXIT_MEASUREMENTS_FAILED)


@main.command()
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--baseline", "-b", type=click.Path(path_type=Path), help="Earlier results folder to compare with.")
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path), help="Report folder (default: RESULTS).")
@click.option("--threshold", "thresholds", multiple=True, help="Override a threshold: METRIC=PERCENT (repeatable).")
@click.option(
    "--pytorch-db",
    type=click.Path(path_type=Path),
    help="Also write rows in the PyTorch OSS benchmark database format.",
)
def report(
    results: Path, baseline: Path | None, out_dir: Path | None, thresholds: tuple[str, ...], pytorch_db: Path | None
) -> None:
    """Write summary.json, report.md and report.html from RESULTS (a folder or results.jsonl).

    With --baseline, changes beyond the plan's thresholds are marked, and the exit status is 4.
    """
    from mobile_export.devicelab.report import build_summary, parse_threshold_overrides, write_reports
    from mobile_export.devicelab.results import read_results, results_path

    current = read_results(results_path(results))
    if not current.records:
        raise UserError(f"{current.path} holds no measurements", hint="run 'mobile-export bench PLAN --out DIR' first")
    base = read_results(results_path(baseline)) if baseline is not None else None
    summary = build_summary(current, base, parse_threshold_overrides(thresholds))
    folder = out_dir or (results if results.is_dir() else results.parent)
    for path in write_reports(summary, folder, pytorch_db):
        click.echo(f"wrote {path}")
    for warning in summary["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    for r in summary["regressions"]:
        click.echo(
            f"REGRESSION {r['bundle']} on {r['device']} ({r['scenario']}): {r['metric']} "
            f"{r['change_pct']:+.1f}% (allowed {r['threshold_pct']:g}%)",
            err=True,
        )
    if summary["regressions"]:
        sys.exit(EXIT_REGRESSION)


if __name__ == "__main__":
    main()
