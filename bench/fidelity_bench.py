"""Fidelity benchmark: scheme x algorithm x backend on the trained tiny Llama, measured on the artifact.

Each row is a real ``mobile-export build`` (a child process), then every bundle runs in its own
runtime (ExecuTorch on the host for .pte files) over a held-out text with ``mobile-export eval``'s
code, against the original model in fp32. Printed per row: artifact size, bits per weight,
perplexity ratio to eager fp32, mean and 99th-percentile KL divergence, top-1 agreement, and the
build's quantize and total seconds. Core ML packages cannot run off macOS: their figures come from
the package's own (decompressed) weights loaded into the PyTorch module that was converted, in
fp32 compute (what the build's verification runs), and are marked so.

    python bench/fidelity_bench.py                         # the default rows (13 builds; long)
    python bench/fidelity_bench.py --rows rtn gptq gptq+rotate+8bit-head
    python bench/fidelity_bench.py --model-path DIR --calib-text FILE --eval-text FILE

Defaults: the trained test model (tests/trained_model.py, shipped in tests/fixtures/models), calibration on
``argparse.py`` + ``difflib.py`` of this Python's standard library, evaluation on the model's
held-out stdlib modules (first 2048 tokens, windows of 256).
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# name -> (target, extra build arguments); every xnnpack row is 8da4w g32 with int8 embeddings
ROWS: dict[str, tuple[str, list[str]]] = {
    "fp32": ("android", ["--quant", "fp32", "--embedding-quant", "none"]),
    "rtn": ("android", ["--quant-algo", "rtn"]),
    "hqq": ("android", ["--quant-algo", "hqq"]),
    "gptq": ("android", ["--quant-algo", "gptq"]),
    "awq": ("android", ["--quant-algo", "awq"]),
    "rtn+rotate": ("android", ["--quant-algo", "rtn", "--rotate"]),
    "hqq+rotate": ("android", ["--quant-algo", "hqq", "--rotate"]),
    "gptq+rotate": ("android", ["--quant-algo", "gptq", "--rotate"]),
    "awq+rotate": ("android", ["--quant-algo", "awq", "--rotate"]),
    "rtn+8bit-head": ("android", ["--quant-algo", "rtn", "--keep-8bit", "lm_head"]),
    "hqq+8bit-head": ("android", ["--quant-algo", "hqq", "--keep-8bit", "lm_head"]),
    "gptq+8bit-head": ("android", ["--quant-algo", "gptq", "--keep-8bit", "lm_head"]),
    "awq+8bit-head": ("android", ["--quant-algo", "awq", "--keep-8bit", "lm_head"]),
    "gptq+rotate+8bit-head": ("android", ["--quant-algo", "gptq", "--rotate", "--keep-8bit", "lm_head"]),
    "gptq+8bit-layer0": ("android", ["--quant-algo", "gptq", "--keep-8bit", "layers.0.*"]),
    "coreml int4 rtn": ("ios", ["--backend", "coreml", "--quant", "int4"]),
    "coreml int4 gptq": ("ios", ["--backend", "coreml", "--quant", "int4", "--quant-algo", "gptq"]),
}
DEFAULT_ROWS = (
    "fp32",
    "rtn",
    "hqq",
    "gptq",
    "awq",
    "rtn+rotate",
    "gptq+rotate",
    "awq+rotate",
    "rtn+8bit-head",
    "gptq+8bit-head",
    "gptq+rotate+8bit-head",
    "coreml int4 rtn",
    "coreml int4 gptq",
)
XNNPACK_COMMON = ["--quant", "8da4w", "--group-size", "32", "--embedding-quant", "int8"]
CALIBRATION_FILES = ("argparse.py", "difflib.py")


def default_texts(folder: Path) -> tuple[Path, Path]:
    """Calibration text (stdlib modules the model may have trained on) and held-out eval text."""
    from trained_model import heldout_text

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    calib = folder / "calib.txt"
    calib.write_text("\n\n".join((stdlib / n).read_text(encoding="utf-8") for n in CALIBRATION_FILES))
    heldout = folder / "heldout.txt"
    heldout.write_text(heldout_text())
    return calib, heldout


def build(name: str, model: Path, calib: Path, out: Path) -> tuple[Path | None, float, str]:
    """Build one row in a child process: (bundle or None, wall seconds, error text)."""
    import subprocess

    target, extra = ROWS[name]
    cmd = [sys.executable, "-m", "mobile_export.cli", "build", "--model-path", str(model), "--target", target]
    if target == "android" and "--quant" not in extra:
        cmd += XNNPACK_COMMON
    cmd += [*extra, "--calib-text", str(calib), "--no-eval", "-o", str(out), "--force", "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return None, wall, (done.stderr.strip().splitlines() or ["?"])[-1]
    return next(p.parent for p in out.glob("*/manifest.json") if not p.parent.name.startswith(".")), wall, ""


def coreml_package_fidelity(bundle: Path, model_path: Path, text: Path, max_tokens: int, window: int):
    """Fidelity of a Core ML package's own weights, decompressed into the module it was converted
    from (rtn and gptq rows: only linear weights differ from the original), fp32 compute."""
    import torch
    import transformers

    from mobile_export.backends import get_backend
    from mobile_export.backends.coreml_checks import load_package_weights, read_package
    from mobile_export.build import convert
    from mobile_export.bundle import read_checked_manifest as open_bundle
    from mobile_export.console import StepUI
    from mobile_export.fidelity import eager_reference, evaluate_runtime
    from mobile_export.quantize import QuantSpec

    manifest = open_bundle(bundle)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(bundle))
    ids = tokenizer(text.read_text())["input_ids"][:max_tokens]

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()

    reference = eager_reference(load(), ids, window)
    spec = QuantSpec(scheme="int4", group_size=manifest.quantization.get("group_size") or 32)
    decoder, _ = convert(load(), spec, manifest.context_length, get_backend("coreml"), StepUI(quiet=True))
    decoder.float()
    load_package_weights(read_package(bundle / manifest.artifact["file"]), decoder)

    class Eager:
        def logits_all(self, tokens, start):
            with torch.no_grad():
                out = decoder.run(torch.tensor([tokens]), start, start + len(tokens), all_positions=True)
            return out[0]

    return evaluate_runtime(Eager(), reference)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(DEFAULT_ROWS))
    parser.add_argument("--model-path", type=Path, help="HF folder (default: the trained test model)")
    parser.add_argument("--calib-text", type=Path)
    parser.add_argument("--eval-text", type=Path)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--out", type=Path, help="keep the bundles here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--reuse", action="store_true", help="keep bundles already in --out instead of rebuilding")
    args = parser.parse_args(argv)

    from mobile_export.bundle import read_checked_manifest as open_bundle
    from mobile_export.evaluate import evaluate_bundles

    work = Path(tempfile.mkdtemp(prefix="fidelity-bench-"))
    out_root = args.out or work / "dist"
    if args.model_path is None:
        from trained_model import trained_model_dir

        args.model_path = trained_model_dir()
    calib, heldout = default_texts(work)
    calib = args.calib_text or calib
    heldout = args.eval_text or heldout

    built: dict[str, tuple[Path | None, float, str]] = {}
    for name in args.rows:
        folder = out_root / name.replace(" ", "-").replace("+", "_")
        existing = [p for p in folder.glob("*/manifest.json") if not p.parent.name.startswith(".")]
        existing = [p.parent for p in existing] if args.reuse else []
        if existing:
            built[name] = (existing[0], 0.0, "")
            continue
        print(f"building {name} ...", file=sys.stderr, flush=True)
        built[name] = build(name, args.model_path, calib, folder)
    bundles = [b for b, _, _ in built.values() if b is not None]
    rows = evaluate_bundles(
        bundles, heldout, model_path=args.model_path, max_tokens=args.max_tokens, window=args.window
    )
    evaluated = {r.bundle: r for r in rows}

    table = []
    for name, (bundle, wall, error) in built.items():
        entry = {"row": name, "build_s": round(wall, 1)}
        if bundle is None:
            entry["error"] = error
            table.append(entry)
            continue
        manifest = open_bundle(bundle)
        quant = manifest.quantization
        artifact = bundle / manifest.artifact["file"]
        size = sum(p.stat().st_size for p in artifact.rglob("*")) if artifact.is_dir() else artifact.stat().st_size
        quantize_s = next(
            (v for k, v in manifest.build["seconds"].items() if k.startswith("Prepare and quantize")), None
        )
        entry.update(
            backend=manifest.backend,
            scheme=f"{quant['scheme']}" + (f"-g{quant['group_size']}" if quant.get("group_size") else ""),
            algorithm=quant.get("algorithm"),
            bytes=size,
            bits_per_weight=quant["bits_per_weight"],
            quantize_s=quantize_s,
        )
        if not wall:  # a reused bundle: the build's own step timings
            entry["build_s"] = round(sum(manifest.build["seconds"].values()), 1)
        row = evaluated.get(bundle)
        if row is not None and row.result is not None:
            r = row.result
            entry.update(
                ppl_ratio=r.perplexity_ratio,
                kl_mean=r.kl_mean,
                kl_p99=r.kl_p99,
                top1=r.top1_agreement,
                tokens=r.tokens,
                ppl=r.perplexity,
                eager_ppl=r.reference_perplexity,
            )
        elif row is not None and manifest.backend == "coreml":
            r = coreml_package_fidelity(bundle, args.model_path, heldout, args.max_tokens, args.window)
            entry.update(
                ppl_ratio=r.perplexity_ratio,
                kl_mean=r.kl_mean,
                kl_p99=r.kl_p99,
                top1=r.top1_agreement,
                tokens=r.tokens,
                note="package weights in PyTorch (Core ML runs on macOS only)",
            )
        elif row is not None:
            entry["skipped"] = row.reason
        table.append(entry)

    base = next((e.get("kl_mean") for e in table if e["row"] == "rtn"), None)
    print(f"\nFidelity on {heldout.name} ({args.max_tokens} tokens, windows of {args.window}), artifact in its runtime")
    print(f"model: {args.model_path}")
    header = "| row | backend | scheme | bytes | bits/w | ppl ratio | KL mean | KL p99 | top-1 | KL vs rtn | quantize s | build s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for e in table:
        if "error" in e:
            print(f"| {e['row']} | build failed: {e['error']} |" + " |" * 10)
            continue
        if "kl_mean" not in e:
            note = e.get("skipped", "not evaluated")
            print(
                f"| {e['row']} | {e['backend']} | {e['scheme']} | {e['bytes']} | {e['bits_per_weight']:.3f} "
                f"| skipped: {note} | | | | | {e['quantize_s'] or 0:.1f} | {e['build_s']:.0f} |"
            )
            continue
        ratio = f"{e['kl_mean'] / base:.2f}x" if base else "-"
        backend = e["backend"] + (" *" if e.get("note") else "")
        print(
            f"| {e['row']} | {backend} | {e['scheme']} | {e['bytes']} | {e['bits_per_weight']:.3f} "
            f"| {e['ppl_ratio']:.4f} | {e['kl_mean']:.5f} | {e['kl_p99']:.4f} | {e['top1']:.1%} | {ratio} "
            f"| {e['quantize_s'] or 0:.1f} | {e['build_s']:.0f} |"
        )
    if any(e.get("note") for e in table):
        print("\n* Core ML: the package's own weights run in PyTorch (fp32 compute); MLModel.predict needs macOS")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
