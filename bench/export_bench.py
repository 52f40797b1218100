"""Export benchmark: build a recipe's shape with random weights, then measure the artifact.

Prints export wall time, peak memory of the build process (as the OS counts it), .pte size,
bits per weight, host prefill/decode tokens/s of the .pte in ExecuTorch's runtime, and the same
speed figures for the original model in eager PyTorch, side by side in one run.

    python bench/export_bench.py                       # SmolLM2-135M shape, 8da4w
    python bench/export_bench.py --recipe phi3-mini    # opt-in full size (3.8B): long, ~12 GB
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(recipe: str, quant: str, out: Path, context: int | None) -> tuple[float, float]:
    """Run ``mobile-export build`` in a child process; return (wall seconds, peak RSS GB)."""
    cmd = [sys.executable, "-m", "mobile_export.cli", "build", recipe, "--target", "android", "--random-weights"]
    cmd += ["--quant", quant, "-o", str(out), "--force", "--quiet"]
    if context:
        cmd += ["--context-length", str(context)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"build failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kb / 1024**2


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def artifact_speed(step, prompt: list[int], decode_tokens: int, repeats: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of a runner-convention ``step(tokens, start_pos)``."""
    prefill = _median_time(lambda: step(prompt, 0), repeats)

    def decode() -> None:
        for i in range(decode_tokens):
            step([prompt[i % len(prompt)]], len(prompt) + i)

    step(prompt, 0)
    dec = _median_time(decode, repeats)
    return len(prompt) / prefill, decode_tokens / dec


def eager_speed(model, prompt: list[int], decode_tokens: int, repeats: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of the transformers model with its own KV cache."""
    ids = torch.tensor([prompt])

    def prefill():
        with torch.no_grad():
            return model(ids, use_cache=True)

    prefill_s = _median_time(prefill, repeats)

    def decode() -> None:
        with torch.no_grad():
            past = model(ids, use_cache=True).past_key_values
            start = time.perf_counter()
            for i in range(decode_tokens):
                out = model(torch.tensor([[prompt[i % len(prompt)]]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
            decode.elapsed = time.perf_counter() - start

    times = []
    for _ in range(repeats):
        decode()
        times.append(decode.elapsed)
    return len(prompt) / prefill_s, decode_tokens / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="smollm2-135m")
    parser.add_argument("--quant", default="8da4w")
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-eager", action="store_true", help="skip the eager PyTorch figures (large models)")
    args = parser.parse_args()

    from mobile_export.bundle import read_manifest
    from mobile_export.recipes import load_recipe
    from mobile_export.runtimes.executorch import ExecuTorchRuntime
    from mobile_export.sources import SourceOptions, load_source

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        wall, peak_gb = build(args.recipe, args.quant, out, args.context_length)
        bundle = out / f"{args.recipe}-android"
        manifest = read_manifest(bundle)
        pte = bundle / "model.pte"
        runtime = ExecuTorchRuntime(pte)
        vocab = manifest.outputs[0].shape[-1]
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, int(vocab), (args.prompt_tokens,), generator=gen).tolist()
        pte_prefill, pte_decode = artifact_speed(runtime.step, prompt, args.decode_tokens, args.repeats)
        size_mb = pte.stat().st_size / 1e6
        bits = manifest.quantization["bits_per_weight"]
        params = manifest.model.parameters

    rows = [
        ("model", f"{args.recipe} shape, {params / 1e6:.1f}M params, random weights, {args.quant}"),
        ("export wall time (whole build: load, quantize, export, lower, verify, bundle)", f"{wall:.1f} s"),
        ("peak memory of the build process (max RSS)", f"{peak_gb:.2f} GB"),
        (".pte size", f"{size_mb:.1f} MB"),
        ("bits per weight (file bits / parameters)", f"{bits:.2f}"),
        (f"host prefill, .pte ({args.prompt_tokens} tokens)", f"{pte_prefill:.1f} tok/s"),
        (f"host decode, .pte ({args.decode_tokens} tokens)", f"{pte_decode:.1f} tok/s"),
    ]
    if not args.skip_eager:
        source = load_source(load_recipe(args.recipe), SourceOptions(random_weights=True))
        eager_prefill, eager_decode = eager_speed(source.model, prompt, args.decode_tokens, args.repeats)
        rows += [
            (f"host prefill, eager PyTorch {str(source.dtype).removeprefix('torch.')}", f"{eager_prefill:.1f} tok/s"),
            (f"host decode, eager PyTorch {str(source.dtype).removeprefix('torch.')}", f"{eager_decode:.1f} tok/s"),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
