#!/usr/bin/env python3
"""TEST DOUBLE of the on-phone benchmark harness (the real ones live with the demo apps).

It follows the harness command line and results-file contract (device_tests/HARNESS.md) without a
model runtime: it reads the pushed bundle's manifest and prompt file (so the transport must have
delivered them), times a small stand-in workload, and reports its own peak resident memory from
/proc/self/status. Fault modes per repetition (taken from the output file name, ``...-<rep>.json``)
come from $FAKE_HARNESS_MODES, a JSON object {"<rep>": MODE}:
  ok (default), garbage (not JSON), missing (no metric fields), failed (status failed),
  crash (killed by a signal, no file), hang (never finishes), wrong-tokens.
"""

import argparse
import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path


def peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--bundle", "--prompt", "--output"):
        parser.add_argument(name, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    args = parser.parse_args()
    match = re.search(r"-(\d+)\.json$", args.output)
    repetition = match.group(1) if match else "1"
    mode = json.loads(os.environ.get("FAKE_HARNESS_MODES", "{}")).get(repetition, "ok")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    print(f"fake harness: repetition {repetition}, mode {mode}")
    if mode == "crash":
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    if mode == "hang":
        time.sleep(3600)
    if mode == "garbage":
        output.write_text("Segmentation fault in libexecutorch.so\n{not json")
        return 0
    start = time.perf_counter()
    manifest = Path(args.bundle) / "manifest.json"
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    for entry in json.loads(manifest.read_text())["files"]:
        (Path(args.bundle) / entry["path"]).read_bytes()
    load_s = time.perf_counter() - start
    prompt = json.loads(Path(args.prompt).read_text())["token_ids"]
    start = time.perf_counter()
    acc = sum(t * t for t in prompt * 200)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(args.new_tokens * (args.warmup + 1)):
        acc = (acc * 31 + step) % 1000003
    decode_s = time.perf_counter() - start
    generated = args.new_tokens - 1 if mode == "wrong-tokens" else args.new_tokens
    result = {
        "harness_schema_version": 1,
        "harness": {"name": "fake-harness (test double)", "version": "0"},
        "runtime": {"name": "none (test double)", "version": "0"},
        "status": "failed" if mode == "failed" else "ok",
        "error": "out of memory while loading model.pte" if mode == "failed" else None,
        "bundle_manifest_sha256": sha,
        "prompt_tokens": len(prompt),
        "generated_tokens": generated,
        "load_s": load_s,
        "ttft_s": prefill_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tokens_per_s": len(prompt) / prefill_s,
        "decode_tokens_per_s": (generated - 1) / decode_s,
        "peak_memory_bytes": peak_bytes(),
        "memory_source": "VmHWM (/proc/self/status)",
    }
    if mode == "missing":
        for key in ("ttft_s", "decode_tokens_per_s", "peak_memory_bytes"):
            del result[key]
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, output)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
