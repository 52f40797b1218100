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


class _RegistryHelp(click.Option):
    """An option whose help text lists what the backend registry holds, built only when help is
    shown (the registry imports every backend, too slow for every start)."""

    def __init__(self, *args, help_from, **kwargs):
        super().__init__(*args, **kwargs)
        self._help_from = help_from

    def get_help_record(self, ctx):
        self.help = self._help_from()  # each time: the registry is the one source
        return super().get_help_record(ctx)


def _backend_help() -> str:
    from mobile_export.backends import backends_help

    return f"Backend (default from the recipe): {backends_help()}."


def _quant_help() -> str:
    from mobile_export.backends import schemes_help

    return f"Weight quantization (default from the recipe): {schemes_help()}."


@main.command()
@click.argument("recipe", required=False)
@click.option("--target", "-t", required=True, help="Platform: android or ios.")
@click.option("--backend", cls=_RegistryHelp, help_from=_backend_help)
@click.option("--quant", cls=_RegistryHelp, help_from=_quant_help)
@click.option("--group-size", type=int, help="Group (block) size for 8da4w, int4 and int4 embeddings: 32, 64 or 128.")
@click.option("--embedding-quant", help="Embedding quantization: none, int8 or int4.")
@click.option("--embedding-group-size", type=int, help="Columns per scale of an int4 embedding (default: --group-size).")
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
@click.option("--opset", type=int, help="ONNX: ai.onnx opset of the graph (default 18).")
@click.option("--min-onnxruntime", help="ONNX: oldest ONNX Runtime release the bundle must load in, e.g. 1.20.")
@click.option(
    "--quant-algo",
    help="How integer weights are chosen (default from the recipe, else rtn): rtn, hqq, gptq or awq "
    "(gptq/awq calibrate on --calib-text, else the package's own broad text).",
)
@click.option(
    "--calib-text",
    type=click.Path(path_type=Path),
    help="Plain-text file to calibrate gptq/awq on (at least 1024 tokens; up to 8192 are used); "
    "default: the package's calibration.txt (prose, dialogue and code).",
)
@click.option(
    "--rotate/--no-rotate",
    default=None,
    help="Fold an orthogonal rotation of the residual stream into the weights (fewer outliers; same graph).",
)
@click.option(
    "--keep-8bit",
    multiple=True,
    metavar="PATTERN",
    help="Keep these layers at 8 bits (repeatable): glob or re:REGEX on names like lm_head, layers.0.*, "
    "layers.{last}.mlp.down_proj, embed_tokens.",
)
@click.option(
    "--group-size-for",
    multiple=True,
    metavar="PATTERN=N",
    help="ONNX: blocks of N (32, 64 or 128) for the layers PATTERN names (repeatable; first match wins), "
    "e.g. 're:layers\\.\\d+\\.mlp\\.(gate|up)_proj=64'.",
)
@click.option(
    "--eval-text",
    type=click.Path(path_type=Path),
    help="Text to measure the artifact's fidelity on (default: the project's fixed_eval.txt; first 512 tokens).",
)
@click.option("--no-eval", is_flag=True, help="Skip the fidelity measurement (perplexity ratio, KL) of the artifact.")
@click.option("--quiet", "-q", is_flag=True, help="Only print the summary.")
@click.option("--verbose", "-v", is_flag=True, help="Also show native runtime logs and library warnings.")
def build(recipe: str | None, target: str, quiet: bool, verbose: bool, **options) -> None:
    """Build a verified bundle from RECIPE (or --model-path) for --target."""
    from mobile_export.build import BuildRequest
    from mobile_export.build import build as run_build
    from mobile_export.console import StepUI
    from mobile_export.report import print_build_summary

    if verbose:
        from mobile_export.runtimes.executorch import show_native_logs

        show_native_logs()
    else:
        import warnings

        # Our KV caches are mutated buffers whose initial state is meant to be meaningless.
        warnings.filterwarnings("ignore", message="Mutation on a buffer in the model", category=UserWarning)

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
@click.option("--prompt", "-p", help="Text to continue; with --chat, the one user message (else read from stdin).")
@click.option(
    "--chat", is_flag=True, help="Chat through the bundle's chat template (a turn per line; empty line or /exit ends)."
)
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy; above 0 samples.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Sample from the smallest set reaching P.")
@click.option("--seed", type=int, help="Seed for sampling (the same seed gives the same text).")
def run(
    bundle: Path,
    prompt: str | None,
    chat: bool,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
) -> None:
    """Generate text with BUNDLE's artifact on this machine, streaming it: continue --prompt, or
    --chat (one turn with --prompt, else a conversation read line by line from stdin)."""
    from mobile_export.generate import Sampling
    from mobile_export.run import run_bundle, run_chat

    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
    if chat:
        from mobile_export.chat import read_turns

        interactive = prompt is None and sys.stdin.isatty()
        turns = [prompt] if prompt is not None else read_turns(sys.stdin, sys.stdout, interactive)
        run_chat(bundle, turns, max_new_tokens, out=sys.stdout, sampling=sampling)
        return
    if prompt is None:
        raise UserError("nothing to continue", hint="pass --prompt TEXT, or --chat")
    run_bundle(bundle, prompt, max_new_tokens, out=sys.stdout, sampling=sampling)


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


# --- fidelity: eval and verify ----------------------------------------------------------------


@main.command("eval")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--text", "text_path", required=True, type=click.Path(path_type=Path), help="UTF-8 text to evaluate on.")
@click.option("--model-path", type=click.Path(path_type=Path), help="The original model's folder (eager reference).")
@click.option("--recipe", help="Recipe of the original model (default: the bundle manifest's local source).")
@click.option("--max-tokens", type=int, default=1024, show_default=True, help="Evaluate the text's first N tokens.")
@click.option("--window", type=int, help="Tokens per window, each from a fresh cache (default: min(context, 256)).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option(
    "--per-layer",
    is_flag=True,
    help="Also rank layer groups by the KL divergence each adds when quantized alone (which to --keep-8bit).",
)
def eval_command(
    bundles: tuple[Path, ...],
    text_path: Path,
    model_path: Path | None,
    recipe: str | None,
    max_tokens: int,
    window: int | None,
    as_json: bool,
    per_layer: bool,
) -> None:
    """Perplexity, KL divergence and top-1 agreement of each BUNDLE's artifact, run in its own
    runtime, against the original model on --text."""
    import json

    from mobile_export.evaluate import evaluate_bundles
    from mobile_export.report import print_eval_table

    rows = evaluate_bundles(
        list(bundles), text_path, model_path=model_path, recipe=recipe, max_tokens=max_tokens, window=window
    )
    sensitivity = {}
    if per_layer:
        from mobile_export.quant_algos.sensitivity import bundles_sensitivity

        sensitivity = bundles_sensitivity(
            list(bundles), text_path, model_path=model_path, recipe=recipe, max_tokens=max_tokens, window=rows[0].window
        )
    if as_json:
        out = [
            {**r.to_dict(), **({"per_layer": sensitivity[r.bundle].to_dict()} if r.bundle in sensitivity else {})}
            for r in rows
        ]
        click.echo(json.dumps({"text": str(text_path), "bundles": out}, indent=2))
    else:
        print_eval_table(rows, text_path.name)
        if sensitivity:
            from mobile_export.quant_algos.sensitivity import print_sensitivity

            print_sensitivity(sensitivity)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def verify(bundle: Path) -> None:
    """Run BUNDLE's artifact here and check it against its reference.json (greedy tokens, top-k log-probs)."""
    from mobile_export.errors import VerificationError
    from mobile_export.reference import verify_bundle
    from mobile_export.report import print_parity_report

    report_, facts = verify_bundle(bundle)
    print_parity_report(bundle, report_, facts)
    if not report_.passed:
        raise VerificationError(
            f"{bundle} does not match its reference.json: {report_.failures[0]}",
            hint="the artifact or its runtime computes something else than the original model",
        )


if __name__ == "__main__":
    main()
