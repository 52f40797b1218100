"""Peer benchmark: our default bundles beside optimum-executorch and ONNX Runtime GenAI's builder.

The same real model (SmolLM2-135M-Instruct, from one GGUF file) is built four ways, one run:

    a. ``mobile-export build smollm2-135m --target android``          (ours: xnnpack 8da4w default)
    b. ``optimum-cli export executorch ... --qlinear 8da4w --qembedding 8w``  (optimum-executorch)
    c. ``mobile-export build smollm2-135m --target android --backend onnx``   (ours: onnx int4 default)
    d. ``python -m onnxruntime_genai.models.builder -p int4 -e cpu``         (ORT GenAI builder)

Our builds read the GGUF (``--model-path FILE.gguf``); the peers read a Hugging Face folder made
from that GGUF (``--hf-dir``, fp32 safetensors). Each peer runs in its own virtual environment:

    .venv/bin/python bench/peer_bench.py \\
        --oe-python /work/peers/oe/bin/python --genai-python /work/peers/genai/bin/python \\
        --hf-dir /work/peers/smollm2-hf --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \\
        [--work DIR] [--skip-builds] [--only xnnpack,oe,onnx,genai] [--rounds 2]

Every build is a child process whose wall time and peak RSS come from ``os.wait4`` (that child's
own rusage, which covers the grandchildren it waited for: no build's peak leaks into another's).
This process imports nothing heavy, so the peak it hands a child across fork/exec stays small.

Each artifact is then run in fresh child processes, alternating between columns for ``--rounds``
rounds (medians over rounds): load seconds, prefill of ``--prompt-tokens`` tokens (one call,
tok/s), and the median decode step over ``--decode-tokens`` greedy steps (tok/s). Our bundles
run in the project's runtimes (``mobile_export.runtimes``); optimum's .pte in ExecuTorch's Python
runtime with its own signature ``forward(input_ids [1,T] int64, cache_position [T] int64)`` →
logits [1,T,vocab]; both ONNX folders also run in ``onnxruntime_genai`` (``og.Generator``:
``append_tokens`` for prefill, ``generate_next_token`` for decode), with ``intra_op_num_threads``
set to the number of cores (GenAI's own default is one thread). ``--skip-builds`` reuses the
outputs under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = ("xnnpack", "oe", "onnx", "genai")
TITLES = {
    "xnnpack": "mobile-export xnnpack",
    "oe": "optimum-executorch",
    "onnx": "mobile-export onnx",
    "genai": "ORT GenAI builder",
}
PEER_OF = {"xnnpack": "oe", "onnx": "genai"}  # ours -> the peer its ratios are taken against
RECIPE = "smollm2-135m"

# The prompt every runtime prefills: fixed ids inside the vocabulary (no tokenizer needed).
COMMON = r"""
import json, os, statistics, sys, time
path, prompt_len, decode_len, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompt = [(7 * i + 3) % 1000 + 10 for i in range(prompt_len)]
def peak_bytes():
    # VmHWM is this process's own peak (ru_maxrss would carry the parent's over the exec)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))
def report(load_s, runs):
    prefill = statistics.median(r[0] for r in runs)
    steps = [s for r in runs for s in r[1]]
    print("RESULT " + json.dumps({"load_s": load_s, "prefill_s": prefill, "prefill_tok_s": prompt_len / prefill,
        "decode_step_s": statistics.median(steps), "decode_tok_s": 1.0 / statistics.median(steps),
        "peak_bytes": peak_bytes(), "threads": threads}))
"""

# Our bundle through the project's runtime (ExecuTorchRuntime / OnnxRuntime): step(tokens, start_pos).
PROJECT_RUNTIME = (
    COMMON
    + r"""
from pathlib import Path
from mobile_export.bundle import read_checked_manifest
from mobile_export.runtimes import loader, artifact_format
bundle = Path(path)
manifest = read_checked_manifest(bundle)
cls = loader(artifact_format(manifest.artifact))
artifact = bundle / manifest.artifact["file"]
if cls.format == "onnxruntime-genai":
    runtime = cls(artifact, threads=threads)
else:
    runtime = cls.open(artifact, manifest.artifact)
def once():
    t0 = time.perf_counter(); logits = runtime.step(prompt, 0); prefill = time.perf_counter() - t0
    steps, pos = [], prompt_len
    for _ in range(decode_len):
        token = int(logits.argmax())
        t0 = time.perf_counter(); logits = runtime.step([token], pos); steps.append(time.perf_counter() - t0)
        pos += 1
    return prefill, steps
once()  # warm-up
report(runtime.load_seconds, [once() for _ in range(2)])
"""
)

# optimum-executorch's .pte: forward(input_ids [1,T] int64, cache_position [T] int64) -> logits [1,T,V].
OE_PTE = (
    COMMON
    + r"""
import torch
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (custom sdpa, update_cache)
from executorch.kernels import quantized  # noqa: F401  (quantized embedding kernels)
from executorch.runtime import Runtime
rt = Runtime.get()
t0 = time.perf_counter()
program = rt.load_program(path)
method = program.load_method("forward")
load_s = time.perf_counter() - t0
def forward(tokens, start):
    ids = torch.tensor([tokens], dtype=torch.long)
    cache_position = torch.arange(start, start + len(tokens), dtype=torch.long)
    return method.execute([ids, cache_position])[0][0, -1]
def once():
    t0 = time.perf_counter(); logits = forward(prompt, 0); prefill = time.perf_counter() - t0
    steps, pos = [], prompt_len
    for _ in range(decode_len):
        token = int(logits.argmax())
        t0 = time.perf_counter(); logits = forward([token], pos); steps.append(time.perf_counter() - t0)
        pos += 1
    return prefill, steps
once()  # warm-up
report(load_s, [once() for _ in range(2)])
"""
)

# An ONNX folder through ONNX Runtime GenAI, intra-op threads = cores (its default is one).
GENAI = (
    COMMON
    + r"""
import onnxruntime_genai as og
t0 = time.perf_counter()
config = og.Config(path)
config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
model = og.Model(config)
load_s = time.perf_counter() - t0
def once():
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=prompt_len + decode_len + 2)
    gen = og.Generator(model, params)
    t0 = time.perf_counter(); gen.append_tokens(prompt); prefill = time.perf_counter() - t0
    steps = []
    gen.generate_next_token()  # picks the first token from the prefill's logits (no model call)
    for _ in range(decode_len):
        t0 = time.perf_counter(); gen.generate_next_token(); steps.append(time.perf_counter() - t0)
    return prefill, steps
once()  # warm-up
report(load_s, [once() for _ in range(2)])
"""
)


@dataclass
class Column:
    """One build and the artifact it leaves: how it is built, where it lands, how it runs."""

    key: str
    build_cmd: list[str]
    artifact: Path  # the bundle folder (ours), the .pte or the GenAI folder (peers)
    runs: list[tuple[str, str, str]] = field(default_factory=list)  # (label, python, child code)
    build: dict | None = None
    measured: dict[str, list[dict]] = field(default_factory=dict)


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` as a child (output to ``log``); its wall seconds, peak RSS and exit code.

    ``os.wait4`` gives this one child's rusage (with the descendants it waited for), so each
    build's peak is its own and not the maximum over every child so far."""
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "peak_bytes": usage.ru_maxrss * 1024, "rc": proc.returncode, "log": str(log)}


def bundle_in(folder: Path) -> Path:
    """The bundle folder (the one holding manifest.json) a ``mobile-export build -o folder`` wrote."""
    found = sorted(folder.glob("*/manifest.json"))
    if not found:
        raise SystemExit(f"no bundle (manifest.json) under {folder}")
    return found[0].parent


def artifact_bytes(key: str, path: Path) -> int:
    """Bytes of the model itself: the .pte, or model.onnx + its external data."""
    if key == "oe":
        return path.stat().st_size
    if key == "xnnpack":
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        return (path / manifest["artifact"]["file"]).stat().st_size
    return sum(p.stat().st_size for p in path.glob("model.onnx*"))


def cpu_probe() -> float:
    """Milliseconds this process takes for a fixed pure-Python loop: logged beside each measurement,
    so a machine that slows down (another tenant, throttling) shows in the log."""
    start = time.perf_counter()
    total = 0
    for i in range(1_000_000):
        total += i & 7
    return (time.perf_counter() - start) * 1000


def measure(python: str, code: str, path: Path, args: argparse.Namespace, threads: int) -> dict:
    """Run one measurement child; its RESULT line as a dict."""
    cmd = [python, "-c", code, str(path), str(args.prompt_tokens), str(args.decode_tokens), str(threads)]
    cwd = args.repo if python == args.me_python else None  # the peers' venvs never see the repo on sys.path
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        tail = (out.stdout + out.stderr)[-2000:]
        raise SystemExit(f"measurement failed ({python} on {path}, rc {out.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT ") :])


def columns(args: argparse.Namespace, work: Path) -> dict[str, Column]:
    """The four builds, each with its command, artifact path and runtime measurements."""
    me = [args.me_python, "-m", "mobile_export.cli", "build", RECIPE, "--model-path", str(args.gguf),
          "--target", "android", "--force", "--quiet"]  # fmt: skip
    if args.no_eval:
        me.append("--no-eval")
    oe_out = work / "oe-8da4w"
    oe_cli = str(Path(args.oe_python).with_name("optimum-cli"))
    oe_cmd = [oe_cli, "export", "executorch", "--model", str(args.hf_dir), "--task", "text-generation",
              "--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache", "--qlinear", "8da4w",
              "--qembedding", "8w", "--output_dir", str(oe_out)]  # fmt: skip
    if args.oe_max_seq_len:
        oe_cmd += ["--max_seq_len", str(args.oe_max_seq_len)]
    genai_out = work / "genai-int4"
    genai_cmd = [args.genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(args.hf_dir),
                 "-o", str(genai_out), "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")]  # fmt: skip
    cols = {
        "xnnpack": Column("xnnpack", [*me, "-o", str(work / "me-xnnpack")], work / "me-xnnpack"),
        "oe": Column("oe", oe_cmd, oe_out / "model.pte"),
        "onnx": Column("onnx", [*me, "--backend", "onnx", "-o", str(work / "me-onnx")], work / "me-onnx"),
        "genai": Column("genai", genai_cmd, genai_out),
    }
    cols["xnnpack"].runs = [("ours", args.me_python, PROJECT_RUNTIME)]
    cols["oe"].runs = [("ours", args.oe_python, OE_PTE)]
    # 'genai' (og.Generator) is the like-for-like row for both ONNX folders; 'ours' is the project's OnnxRuntime
    cols["onnx"].runs = [("genai", args.genai_python, GENAI), ("ours", args.me_python, PROJECT_RUNTIME)]
    cols["genai"].runs = [("genai", args.genai_python, GENAI)]
    return cols


def fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(cols: dict[str, Column], args: argparse.Namespace, threads: int) -> str:
    """The markdown table of every figure, and the ratios ours/peer.

    Runtime cells are the median over rounds with the (min–max) over rounds; their ratios are paired:
    ours / peer within each round (the two ran back to back), then the median of those, so a
    machine that slows down between rounds shifts both sides of a ratio alike."""
    keys = [k for k in COLUMNS if k in cols]

    def build_fig(key: str, name: str, scale: float) -> list[float] | None:
        build = cols[key].build
        return None if build is None else [build[name] / scale]

    def run_figs(key: str, label: str, name: str, scale: float = 1.0) -> list[float] | None:
        runs = cols[key].measured.get(label)
        return [r[name] / scale for r in runs] if runs else None

    def runtime_figs(key: str, name: str, scale: float = 1.0) -> list[float] | None:
        # ExecuTorch columns: their own runtime; ONNX columns: GenAI's Generator (like for like)
        return run_figs(key, "genai" if key in ("onnx", "genai") else "ours", name, scale)

    def cell(values: list[float] | None, digits: int) -> str:
        if not values:
            return "—"
        text = fmt(statistics.median(values), digits)
        if len(values) > 1:
            text += f" ({min(values):.{digits}f}–{max(values):.{digits}f})"
        return text

    def ratio(a: list[float] | None, b: list[float] | None) -> str:
        if not a or not b:
            return "—"
        paired = [x / y for x, y in zip(a, b, strict=False) if y]
        if not paired:
            return "—"
        text = f"{statistics.median(paired):.2f}x"
        return text + (f" ({min(paired):.2f}–{max(paired):.2f})" if len(paired) > 1 else "")

    rows: list[tuple[str, dict[str, list[float] | None], int]] = [  # (figure, values per column, digits)
        ("build wall s", {k: build_fig(k, "wall_s", 1) for k in keys}, 1),
        ("build peak RSS GB", {k: build_fig(k, "peak_bytes", 1e9) for k in keys}, 2),
        ("artifact MB", {k: [artifact_bytes(k, cols[k].artifact) / 1e6] for k in keys}, 1),
        ("load s", {k: runtime_figs(k, "load_s") for k in keys}, 3),
        (f"prefill {args.prompt_tokens} tok/s", {k: runtime_figs(k, "prefill_tok_s") for k in keys}, 1),
        (f"decode tok/s (median step of {args.decode_tokens})", {k: runtime_figs(k, "decode_tok_s") for k in keys}, 1),
        ("run peak RSS MB", {k: runtime_figs(k, "peak_bytes", 1e6) for k in keys}, 0),
    ]  # fmt: skip
    if "onnx" in cols and cols["onnx"].measured.get("ours"):
        for name, fig, digits in (("load s", "load_s", 3), ("prefill tok/s", "prefill_tok_s", 1),
                                  ("decode tok/s", "decode_tok_s", 1)):  # fmt: skip
            rows.append(
                (f"{name}, onnx via mobile_export OnnxRuntime", {"onnx": run_figs("onnx", "ours", fig)}, digits)
            )
    pairs = [(ours, peer) for ours, peer in PEER_OF.items() if ours in cols and peer in cols]
    header = ["figure", *(TITLES[k] for k in keys), *(f"{ours}/{peer}" for ours, peer in pairs)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values, digits in rows:
        cells = [name, *(cell(values.get(k), digits) for k in keys)]
        cells += [ratio(values.get(ours), values.get(peer)) for ours, peer in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Runtime figures: median (min–max) over {args.rounds} rounds of fresh child processes, columns alternating "
        "(order reversed every other round); ratios paired within each round, then their median (min–max); each child does "
        f"one warm-up, then 2 measured sequences ({args.prompt_tokens}-token prefill in one call, {args.decode_tokens} "
        "greedy decode steps).",
        "ExecuTorch columns: ExecuTorch's Python runtime (ours via mobile_export.runtimes.ExecuTorchRuntime, optimum's "
        ".pte via executorch.runtime forward(input_ids, cache_position)).",
        f"ONNX columns: onnxruntime_genai og.Generator with intra_op_num_threads={threads} (= cores; GenAI's default "
        "is 1 thread) for both folders; the extra rows run our folder through mobile_export's OnnxRuntime "
        f"(onnxruntime InferenceSession, {threads} threads).",
        "Each round's lines above end with a CPU probe (ms for a fixed Python loop in the parent, just before "
        "that child): rounds whose probes differ a lot ran on a machine whose speed changed.",
        "Build figures: each build one child process, wall and peak RSS from os.wait4. Ratios: ours / peer (for "
        "tok/s, >1 means ours is faster; for the others, <1 means ours is smaller/faster).",
    ]
    return "\n".join(lines + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oe-python", required=True, help="python of the venv with optimum-executorch")
    parser.add_argument("--genai-python", required=True, help="python of the venv with onnxruntime-genai")
    parser.add_argument("--me-python", default=sys.executable, help="python with mobile_export (default: this one)")
    parser.add_argument("--hf-dir", type=Path, required=True, help="HF folder made from the GGUF (for the peers)")
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF file (for our builds)")
    parser.add_argument("--work", type=Path, default=Path("peer-bench-work"), help="where builds and logs go")
    parser.add_argument("--skip-builds", action="store_true", help="reuse the outputs already under --work")
    parser.add_argument("--only", default=",".join(COLUMNS), help="columns to run: " + ",".join(COLUMNS))
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="runtime threads (ORT / GenAI)")
    parser.add_argument("--oe-max-seq-len", type=int, default=0, help="pass --max_seq_len to optimum (0: its default)")
    parser.add_argument("--no-eval", action="store_true", help="pass --no-eval to our builds")
    args = parser.parse_args()
    args.repo = str(Path(__file__).resolve().parents[1])
    chosen = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = sorted(set(chosen) - set(COLUMNS))
    if unknown:
        parser.error(f"--only: unknown column(s) {', '.join(unknown)}; choose from {', '.join(COLUMNS)}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cols = {k: c for k, c in columns(args, work).items() if k in chosen}
    print(f"peer_bench started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} cores, work {work}")

    builds_file = work / "builds.json"
    saved = json.loads(builds_file.read_text()) if builds_file.exists() else {}
    for key, col in cols.items():
        if args.skip_builds:
            col.build = saved.get(key)
        else:
            print(f"building {key}: {' '.join(col.build_cmd)}", flush=True)
            probe = cpu_probe()
            col.build = run_measured(col.build_cmd, work / f"build-{key}.log")
            col.build["probe_ms"] = [probe, cpu_probe()]  # before and after: did the machine's speed hold?
            if col.build["rc"] != 0:
                raise SystemExit(f"build {key} failed (rc {col.build['rc']}), see {col.build['log']}")
            print(
                f"  {col.build['wall_s']:.1f} s, peak {col.build['peak_bytes'] / 1e9:.2f} GB (cpu probe before/after "
                f"{probe:.0f}/{col.build['probe_ms'][1]:.0f} ms)",
                flush=True,
            )
            saved[key] = col.build
            builds_file.write_text(json.dumps(saved, indent=2))
        if key in ("xnnpack", "onnx"):
            col.artifact = bundle_in(col.artifact)
        if not col.artifact.exists():
            raise SystemExit(f"{key}: no artifact at {col.artifact} (build it, or drop --skip-builds)")

    for round_no in range(args.rounds):
        order = list(cols.values()) if round_no % 2 == 0 else list(reversed(cols.values()))
        for col in order:
            for label, python, code in col.runs:
                probe = cpu_probe()
                result = measure(python, code, col.artifact, args, args.threads)
                result["probe_ms"] = probe
                col.measured.setdefault(label, []).append(result)
                print(
                    f"round {round_no + 1} {col.key}/{label}: load {result['load_s']:.3f} s, prefill "
                    f"{result['prefill_tok_s']:.1f} tok/s, decode {result['decode_tok_s']:.1f} tok/s, "
                    f"peak {result['peak_bytes'] / 1e6:.0f} MB (cpu probe {probe:.0f} ms)",
                    flush=True,
                )
    (work / "runs.json").write_text(json.dumps({k: c.measured for k, c in cols.items()}, indent=2))
    print()
    print(table(cols, args, args.threads))
    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; artifacts and logs under {work}")


if __name__ == "__main__":
    main()
