"""Fidelity of quantization choices on a real trained model, measured eagerly and on artifacts.

Two texts, neither of them calibration text: prose (the package's ``fixed_eval.txt``) and code
(this Python's ``argparse.py``), the first ``--tokens`` tokens of each in windows of 256,
against the model in fp32. Per row and text: estimated (eager rows) or real (artifacts) bytes,
mean KL divergence, perplexity ratio and top-1 agreement.

    # eager rows: the build's own quantization pipeline (quantize_decoder), no export
    python bench/real_fidelity_bench.py eager --model-path DIR [--rows rtn hqq ...]
    # per-layer sensitivity of one scheme (one group quantized at a time)
    python bench/real_fidelity_bench.py sensitivity --model-path DIR --rows hqq
    # what keeping one group at 8 bits buys when everything else is 8da4w (how --keep-8bit defaults are chosen)
    python bench/real_fidelity_bench.py restore --model-path DIR
    # artifacts: our bundles and the peers' outputs, each in its own runtime
    python bench/real_fidelity_bench.py artifacts --model-path DIR --pte NAME=FILE --onnx NAME=DIR --bundle DIR

Eager xnnpack rows run ExportableDecoder exactly as the build's lowering-parity reference does
(torchao's 8da4w eager path with scales as XNNPACK stores them). Results are appended as JSON
lines to ``--out`` (default bench/results/real_fidelity.jsonl) and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PROSE = REPO / "mobile_export" / "assets" / "text" / "fixed_eval.txt"
CODE = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
WINDOW = 256

# name -> QuantSpec fields for the xnnpack eager rows (8da4w, int8 embedding unless said)
EAGER_ROWS: dict[str, dict] = {
    "rtn-g32": {"algo": "rtn"},
    "hqq-g32": {"algo": "hqq"},
    "rtn-g64": {"algo": "rtn", "group_size": 64},
    "hqq-g64": {"algo": "hqq", "group_size": 64},
    "hqq-g128": {"algo": "hqq", "group_size": 128},
    "rtn-g32+8bit-head": {"algo": "rtn", "keep_8bit": ("lm_head",)},
    "hqq-g32+8bit-head": {"algo": "hqq", "keep_8bit": ("lm_head",)},
    "hqq-g64+8bit-head": {"algo": "hqq", "group_size": 64, "keep_8bit": ("lm_head",)},
    "hqq-g128+8bit-head": {"algo": "hqq", "group_size": 128, "keep_8bit": ("lm_head",)},
    "gptq-g32": {"algo": "gptq"},
    "gptq-g32+8bit-head": {"algo": "gptq", "keep_8bit": ("lm_head",)},
    "gptq-g64+8bit-head": {"algo": "gptq", "group_size": 64, "keep_8bit": ("lm_head",)},
    "awq-g32+8bit-head": {"algo": "awq", "keep_8bit": ("lm_head",)},
    "hqq-g32+emb-none": {"algo": "hqq", "embedding": "none"},
    "hqq-g32+8bit-head+emb4": {"algo": "hqq", "keep_8bit": ("lm_head",), "embedding": "int4"},
    "hqq-g64+8bit-head+emb4": {"algo": "hqq", "group_size": 64, "keep_8bit": ("lm_head",), "embedding": "int4"},
    "gptq-g32+8bit-head+emb4": {"algo": "gptq", "keep_8bit": ("lm_head",), "embedding": "int4"},
    "gptq-g64+8bit-head+emb4": {"algo": "gptq", "group_size": 64, "keep_8bit": ("lm_head",), "embedding": "int4"},
    "rtn-g32+emb4": {"algo": "rtn", "embedding": "int4"},
    "rtn-g32+8bit-head+emb4": {"algo": "rtn", "keep_8bit": ("lm_head",), "embedding": "int4"},
}
# the smollm2-135m android default: 8-bit head, every v_proj and the four down_proj that `restore` ranks first
SENSITIVE = ("lm_head", r"re:layers\.\d+\.self_attn\.v_proj", "layers.2.mlp.down_proj",
             "layers.11.mlp.down_proj", "layers.28.mlp.down_proj", "layers.{last}.mlp.down_proj")  # fmt: skip
EAGER_ROWS.update({
    "hqq-g32+8bit-sensitive+emb4g192": {"algo": "hqq", "keep_8bit": SENSITIVE, "embedding": "int4",
                                        "embedding_group_size": 192},
    "rtn-g32+8bit-sensitive+emb4g192": {"algo": "rtn", "keep_8bit": SENSITIVE, "embedding": "int4",
                                        "embedding_group_size": 192},
    "hqq-g32+8bit-sensitive-but-layer2+emb4g288": {"algo": "hqq", "keep_8bit": SENSITIVE[:2] + SENSITIVE[3:],
                                                   "embedding": "int4", "embedding_group_size": 288},
})  # fmt: skip
PARIS = "The capital of France is"


def load_model(model_path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32, trust_remote_code=False)
    return model.eval()


def load_texts(tokenizer, tokens: int) -> dict[str, list[int]]:
    """Token ids of the prose and code texts (first ``tokens`` of each)."""
    out = {}
    for name, path in (("prose", PROSE), ("code", CODE)):
        out[name] = list(tokenizer(path.read_text(encoding="utf-8"))["input_ids"])[:tokens]
    return out


def references(model, texts: dict[str, list[int]]):
    from mobile_export.fidelity import eager_reference

    return {name: eager_reference(model, ids, WINDOW) for name, ids in texts.items()}


def decoder_window_logits(decoder, token_ids: list[int]):
    """All-position logits of an ExportableDecoder window by window (fresh cache per window)."""
    from mobile_export.fidelity import windows

    for chunk in windows(token_ids, WINDOW):
        decoder.reset_cache()
        ids = torch.tensor([chunk[:-1]], dtype=torch.long)
        with torch.no_grad():
            yield decoder.run(ids, 0, ids.shape[1], all_positions=True)[0].float()


def estimated_bytes(decoder, spec) -> int:
    """Bytes of the lowered weights: 4-bit groups with bf16 scales, 8-bit channels with fp32
    scales, int8 embedding rows with fp32 scales, fp32 norms."""
    total = 0
    for module in decoder.modules():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if hasattr(weight, "qdata"):
            rows, cols = weight.qdata.shape
            bits = 4 if weight.target_dtype == torch.int4 else 8
            scales = weight.scale.numel()
            total += rows * cols * bits // 8 + scales * (2 if bits == 4 and scales > rows else 4)
        else:
            total += weight.numel() * 4
    return total


def eager_row(name: str, fields: dict, model_path: Path, refs: dict, calib: Path | None) -> dict:
    from transformers import AutoTokenizer

    from mobile_export.backends import get_backend
    from mobile_export.build import convert
    from mobile_export.console import StepUI
    from mobile_export.fidelity import accumulate_windows
    from mobile_export.memory import release_memory
    from mobile_export.quant_algos.calibration import load_calibration
    from mobile_export.quantize import QuantSpec

    spec = QuantSpec(**{"scheme": "8da4w", "embedding": "int8", **fields})
    backend = get_backend("xnnpack")
    model = load_model(model_path)
    calibration = None
    if spec.algo in ("gptq", "awq"):
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        calibration = load_calibration(
            calib, lambda t: tokenizer(t)["input_ids"], spec.algo, 2048, int(model.config.vocab_size)
        )
    start = time.perf_counter()
    decoder, _report = convert(model, spec, 2048, backend, StepUI(quiet=True), calibration)
    seconds = time.perf_counter() - start
    row = {"row": name, "kind": "eager xnnpack", "label": spec.label, "bytes": estimated_bytes(decoder, spec),
           "quantize_s": round(seconds, 1)}  # fmt: skip
    for text, ref in refs.items():
        result = accumulate_windows(decoder_window_logits(decoder, ref.token_ids), ref).result()
        row[text] = _figures(result)
    decoder.reset_cache()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    row["paris"] = tokenizer.decode([int(decoder.step(tokenizer(PARIS)["input_ids"], 0).argmax())])
    del decoder, model
    release_memory()
    return row


def _fake_8da4w(model, eight_bit) -> torch.nn.Module:
    """A copy of ``model`` with 8da4w simulated in plain torch (fast enough to try 40 layouts):
    the project's torchao grid (:mod:`mobile_export.quant_algos.grid`: int4 groups of 32 with bf16
    scales, as XNNPACK stores them), int8 per-channel weights for the linears ``eight_bit(name)`` names, and per-token asymmetric int8
    activations into every linear. The LM head is 8-bit and the embedding full precision: the
    question is what each decoder weight costs, not what the tables do."""
    import copy

    from mobile_export.quant_algos.grid import dequantize_grouped, group_scales, quantize_grouped

    def on_grid(w, group: int, bits: int, bf16: bool):
        scale = group_scales(w, group, bits)
        scale = scale.to(torch.bfloat16).float() if bf16 else scale
        return dequantize_grouped(quantize_grouped(w, scale, group, bits), scale, group)

    def int4(w):
        return on_grid(w, 32, 4, bf16=True)

    def int8(w):
        return on_grid(w, w.shape[1], 8, bf16=False)

    def activations(_module, args):
        x = args[0]
        low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
        scale = ((high - low) / 255).clamp(min=1e-9)
        zero = (-128 - low / scale).round().clamp(-128, 127)
        return (((x / scale + zero).round().clamp(-128, 127) - zero) * scale,)

    copied = copy.deepcopy(model)
    copied.lm_head.weight = torch.nn.Parameter(int8(copied.lm_head.weight.detach().clone()))
    for name, module in copied.named_modules():
        if isinstance(module, torch.nn.Linear):
            short = name.removeprefix("model.")
            if short != "lm_head":
                module.weight.data = int8(module.weight.data) if eight_bit(short) else int4(module.weight.data)
            module.register_forward_pre_hook(activations)
    return copied


def restore_gains(model, refs: dict) -> list[tuple[str, dict[str, float]]]:
    """KL each group gives back when it alone is kept at 8 bits (per linear kind across layers, then
    each layer's down_proj), against the all-4-bit simulation of :func:`_fake_8da4w`."""
    from mobile_export.fidelity import accumulate_windows, iter_eager_logits

    def kl(copied) -> dict[str, float]:
        return {
            text: accumulate_windows(iter_eager_logits(copied, ref.token_ids, WINDOW), ref).result().kl_mean
            for text, ref in refs.items()
        }

    base = kl(_fake_8da4w(model, lambda name: False))
    groups = [(kind, lambda n, k=kind: n.endswith(k)) for kind in
              ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]  # fmt: skip
    groups += [(f"layers.{i}.mlp.down_proj", lambda n, i=i: n == f"layers.{i}.mlp.down_proj")
               for i in range(len(model.model.layers))]  # fmt: skip
    out = [("all 4-bit (KL)", base)]
    for label, chosen in groups:
        figures = kl(_fake_8da4w(model, chosen))
        out.append((label, {text: base[text] - figures[text] for text in base}))
        print(f"  {label:26} " + " ".join(f"{t} {v:+.4f}" for t, v in out[-1][1].items()), flush=True)
    return out


def _figures(result) -> dict:
    return {
        "kl": round(result.kl_mean, 4),
        "ppl_ratio": round(result.perplexity_ratio, 4),
        "top1": round(result.top1_agreement, 4),
        "tokens": result.tokens,
    }


def artifact_row(name: str, kind: str, runtime, nbytes: int, refs: dict, tokenizer) -> dict:
    from mobile_export.fidelity import evaluate_runtime

    row = {"row": name, "kind": kind, "bytes": nbytes}
    for text, ref in refs.items():
        row[text] = _figures(evaluate_runtime(runtime, ref))
    row["paris"] = tokenizer.decode([int(_prompt_logits(runtime, tokenizer(PARIS)["input_ids"]).argmax())])
    return row


def _prompt_logits(runtime, ids: list[int]):
    """Last-token logits of a prompt: one prefill, or token by token where a peer's program
    refuses a prefill of this length."""
    if hasattr(runtime, "reset"):
        runtime.reset()
    try:
        return runtime.step(ids, 0)
    except RuntimeError:
        logits = None
        for pos, token in enumerate(ids):
            logits = runtime.step([token], pos)
        return logits


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".onnx", ".data", ".pte", ".bin")
    )


def print_table(rows: list[dict]) -> None:
    texts = ("prose", "code")
    head = f"{'row':34} {'kind':16} {'MB':>7} " + " ".join(f"{t + ' KL':>9} {'ppl x':>7} {'top-1':>6}" for t in texts)
    print(head)
    for row in rows:
        cells = []
        for t in texts:
            f = row.get(t)
            cells.append(f"{f['kl']:9.4f} {f['ppl_ratio']:7.3f} {f['top1']:6.1%}" if f else " " * 24)
        paris = f" {row['paris']!r}" if "paris" in row else ""
        print(f"{row['row'][:34]:34} {row['kind'][:16]:16} {row['bytes'] / 1e6:7.2f} " + " ".join(cells) + paris)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("eager", "sensitivity", "restore", "artifacts"))
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--rows", nargs="*", default=None, help=f"eager rows: {', '.join(EAGER_ROWS)}")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--calib-text", type=Path, default=None, help="default: the package's calibration text")
    parser.add_argument("--pte", action="append", default=[], help="NAME=FILE.pte (a peer's or ours)")
    parser.add_argument("--onnx", action="append", default=[], help="NAME=FOLDER (ONNX Runtime GenAI folder)")
    parser.add_argument("--bundle", action="append", default=[], type=Path, help="a mobile-export bundle")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "real_fidelity.jsonl")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model_path))
    model = load_model(args.model_path)
    refs = references(model, load_texts(tokenizer, args.tokens))
    rows: list[dict] = []
    if args.mode == "sensitivity":
        from mobile_export.quant_algos.sensitivity import layer_sensitivity
        from mobile_export.quantize import QuantSpec

        for name in args.rows or ["hqq-g32"]:
            spec = QuantSpec(**{"scheme": "8da4w", "embedding": "int8", **EAGER_ROWS[name]})
            groups = layer_sensitivity(model, spec, refs["prose"])
            print(f"per-layer sensitivity, {spec.label}, prose ({refs['prose'].targets.numel()} tokens)")
            for g in groups:
                print(f"  {g.group:14} KL {g.kl_mean:.4f} top-1 {g.top1_agreement:.1%} "
                      f"+8bit {g.extra_bytes_8bit / 1e6:.2f} MB")  # fmt: skip
        return 0
    if args.mode == "restore":
        print("KL given back by keeping one group at 8 bits (8da4w simulated in torch; + is better)")
        restore_gains(model, refs)
        return 0
    del model
    if args.mode == "eager":
        from mobile_export.quant_algos.calibration import DEFAULT_CALIBRATION_TEXT

        calib = args.calib_text or DEFAULT_CALIBRATION_TEXT
        for name in args.rows or list(EAGER_ROWS):
            row = eager_row(name, EAGER_ROWS[name], args.model_path, refs, calib)
            rows.append(row)
            _append(args.out, row)
            print_table([row])
            sys.stdout.flush()
    else:
        from mobile_export.runtimes.executorch import ExecuTorchRuntime
        from mobile_export.runtimes.onnx import OnnxRuntime

        for item in args.pte:
            name, _, path = item.partition("=")
            row = artifact_row(name, "pte", ExecuTorchRuntime(Path(path)), folder_bytes(Path(path)), refs, tokenizer)
            rows.append(row)
            _append(args.out, row)
        for item in args.onnx:
            name, _, path = item.partition("=")
            folder = Path(path)
            row = artifact_row(name, "onnx", OnnxRuntime(folder / "model.onnx"), folder_bytes(folder), refs, tokenizer)
            rows.append(row)
            _append(args.out, row)
        for bundle in args.bundle:
            from mobile_export.bundle import read_checked_manifest
            from mobile_export.runtimes import open_bundle

            manifest = read_checked_manifest(bundle)
            files = manifest.artifact.get("files") or [manifest.artifact["file"]]
            nbytes = sum(folder_bytes(bundle / f) for f in files)
            runtime = open_bundle(bundle, manifest)
            row = artifact_row(bundle.name, manifest.backend, runtime, nbytes, refs, tokenizer)
            rows.append(row)
            _append(args.out, row)
    print_table(rows)
    return 0


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({**row, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
