"""Core ML conversion benchmark: build a recipe's shape for iOS with random weights, per scheme.

Prints, per compression scheme, the whole build's wall time and the seconds of the convert step,
peak memory of the build process (as the OS counts it), package size, bits per weight over the
whole package and over its weight file. Each scheme is a separate child process, so peaks do
not mix.

    python bench/coreml_bench.py                                   # SmolLM2-135M shape: int4, palettize4, fp16
    python bench/coreml_bench.py --recipe llama-3.2-1b --schemes int4 --context 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(recipe: str, scheme: str, backend: str, out: Path, context: int | None) -> tuple[float, float, dict]:
    """One ``mobile-export build`` in a child; returns (wall s, peak RSS GB of that child, manifest)."""
    cmd = [sys.executable, "-m", "mobile_export.cli", "build", recipe, "--target", "ios", "--random-weights"]
    cmd += ["--backend", backend, "--quant", scheme, "-o", str(out), "--force", "--quiet"]
    if context:
        cmd += ["--context-length", str(context)]
    # A small wrapper process runs the build, so RUSAGE_CHILDREN there is this build's peak alone.
    wrapper = (
        "import json, resource, subprocess, sys; "
        "code = subprocess.run(json.loads(sys.argv[1]), capture_output=True).returncode; "
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, json.dumps(cmd)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    code, peak_kb = (int(v) for v in done.stdout.split())
    if code != 0:
        sys.exit(f"build failed ({code}); run it by hand: {' '.join(cmd)}")
    name = f"{recipe}-ios" if backend == "coreml" else f"{recipe}-ios-{backend}"
    manifest = json.loads((out / name / "manifest.json").read_text())
    return wall, peak_kb / 1024**2, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="smollm2-135m")
    parser.add_argument("--schemes", default="int4,palettize4,fp16")
    parser.add_argument("--backend", default="coreml")
    parser.add_argument("--context", type=int, default=None, help="KV-cache length (default: the recipe's)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes.split(","):
            wall, peak, manifest = build(args.recipe, scheme, args.backend, Path(tmp), args.context)
            params = manifest["model"]["parameters"]
            artifact = manifest["artifact"]["file"]
            size = sum(f["bytes"] for f in manifest["files"] if f["path"].split("/")[0] == artifact)
            weights = manifest["verification"].get("coreml_package", {}).get("weight_file_bytes")
            convert = manifest["build"]["seconds"].get(f"Export and convert ({args.backend})", float("nan"))
            rows.append((scheme, wall, convert, peak, size, params, weights))
            print(f"  done {scheme}: {wall:.1f}s", file=sys.stderr)
    print(f"{args.recipe} shape, random weights, --target ios --backend {args.backend}")
    print(
        f"{'scheme':<11} {'build s':>8} {'convert s':>10} {'peak GB':>8} {'size MB':>8} {'bits/w':>7} {'weight-file bits/w':>19}"
    )
    for scheme, wall, convert, peak, size, params, weights in rows:
        wbits = f"{weights * 8 / params:.2f}" if weights else "-"
        print(
            f"{scheme:<11} {wall:>8.1f} {convert:>10.1f} {peak:>8.2f} {size / 1e6:>8.1f} "
            f"{size * 8 / params:>7.2f} {wbits:>19}"
        )


if __name__ == "__main__":
    main()
