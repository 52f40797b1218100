"""ONNX benchmark: our int4 bundle beside ONNX Runtime GenAI's own model builder, same model, one run.

Both export the same random-weight model of a recipe's shape (default: SmolLM2-135M) to int4
(block 32, accuracy level 4, CPU); both folders are then loaded and run with onnxruntime-genai in
fresh processes (load, prefill, decode, process peak memory). Export wall time and peak memory are
each measured as a whole child process.

    python bench/onnx_bench.py [--recipe smollm2-135m] [--prompt-tokens 32] [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE = r"""
import json, sys, time, resource
import onnxruntime_genai as og
folder, prompt_len, decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter(); model = og.Model(folder); load = time.perf_counter() - start
prompt = [(7 * i + 3) % 1000 + 10 for i in range(prompt_len)]
def once():
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=prompt_len + decode + 1)
    gen = og.Generator(model, params)
    t0 = time.perf_counter(); gen.append_tokens(prompt); t1 = time.perf_counter()
    for _ in range(decode):
        gen.generate_next_token()
    return t1 - t0, time.perf_counter() - t1
once()  # warm-up
runs = sorted(once() for _ in range(3))
prefill, decode_s = runs[1]
# VmHWM is this process's own peak (ru_maxrss would carry the parent's over the exec)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"load_s": load, "prefill_s": prefill, "decode_tok_s": decode / decode_s, "peak_bytes": peak}))
"""

SAVE = r"""
import sys
from mobile_export.recipes import load_recipe
from mobile_export.sources import SourceOptions, load_source
source = load_source(load_recipe(sys.argv[1]), SourceOptions(random_weights=True))
source.model.save_pretrained(sys.argv[2], safe_serialization=True)
source.tokenizer.save_pretrained(sys.argv[2])
print(source.parameters)
"""


PEAK_OF = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL,"
    " stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one command, run under its own parent so peaks don't mix."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK_OF, *cmd], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return wall, int(out.stdout.strip().splitlines()[-1]) * 1024 / 1e9


def folder_bytes(folder: Path, names: tuple[str, ...]) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).exists())


def measure(folder: Path, prompt: int, decode: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), str(prompt), str(decode)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()

    # This process stays small (no torch): children's peaks are measured from fresh processes.
    work = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    hf_dir = work / "hf"
    saved = subprocess.run(
        [sys.executable, "-c", SAVE, args.recipe, str(hf_dir)], check=True, capture_output=True, text=True
    )
    params = int(saved.stdout.strip().splitlines()[-1])

    # The same random weights (recipe + seed 0) that were saved for the builder; built as random
    # weights, so quantization cost is recorded rather than enforced (random logits are flat).
    ours_cmd = [sys.executable, "-m", "mobile_export.cli", "build", args.recipe, "--random-weights", "-t", "android",
                "--backend", "onnx", "--context-length", str(args.context), "-o", str(work / "ours"), "-q"]  # fmt: skip
    ours_time, ours_peak = timed(ours_cmd)
    ours = work / "ours" / f"{args.recipe}-android-onnx"
    builder_cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o",
                   str(work / "builder"), "-p", "int4", "-e", "cpu", "-c", str(work / "cache")]  # fmt: skip
    builder_time, builder_peak = timed(builder_cmd)
    builder = work / "builder"

    # Runs alternate between the two folders (3 rounds, medians) so machine noise hits both alike.
    runs: dict[str, list[dict]] = {"ours": [], "builder": []}
    for _ in range(3):
        runs["ours"].append(measure(ours, args.prompt_tokens, args.decode_tokens))
        runs["builder"].append(measure(builder, args.prompt_tokens, args.decode_tokens))
    rows = []
    for name, key, folder, wall, peak in (
        ("mobile-export", "ours", ours, ours_time, ours_peak),
        ("ORT GenAI builder", "builder", builder, builder_time, builder_peak),
    ):
        size = folder_bytes(folder, ("model.onnx", "model.onnx.data"))
        run = {k: statistics.median(r[k] for r in runs[key]) for k in runs[key][0]}
        rows.append((name, wall, peak, size, size * 8 / params, run))
    print(f"\n{args.recipe} shape, {params / 1e6:.1f}M params, random weights, int4 block 32, CPU")
    header = f"{'':20} {'export s':>9} {'peak GB':>8} {'size MB':>8} {'bits/w':>7} {'load s':>7} "
    print(header + f"{'prefill ' + str(args.prompt_tokens) + ' s':>12} {'decode tok/s':>13} {'run peak MB':>12}")
    for name, wall, peak, size, bits, run in rows:
        print(
            f"{name:20} {wall:9.1f} {peak:8.2f} {size / 1e6:8.1f} {bits:7.2f} {run['load_s']:7.3f} "
            f"{run['prefill_s']:12.4f} {run['decode_tok_s']:13.1f} {run['peak_bytes'] / 1e6:12.0f}"
        )
    ours_row, theirs = rows
    print(
        f"\nratios (ours / builder): export time {ours_row[1] / theirs[1]:.2f}x, peak {ours_row[2] / theirs[2]:.2f}x, "
        f"size {ours_row[3] / theirs[3]:.3f}x, decode {ours_row[5]['decode_tok_s'] / theirs[5]['decode_tok_s']:.2f}x, "
        f"prefill time {ours_row[5]['prefill_s'] / theirs[5]['prefill_s']:.2f}x, "
        f"load {ours_row[5]['load_s'] / theirs[5]['load_s']:.2f}x"
    )
    print(f"(folders left in {work})")


if __name__ == "__main__":
    main()
