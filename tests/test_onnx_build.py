"""``--backend onnx``: ONNX Runtime GenAI folders for Android and iOS.

Tiny, briefly trained Llama / Phi-3 / Qwen2 / Qwen3 / Gemma / Gemma 2 folders go through the CLI;
the saved graph is then read back (op types and attributes, inputs and outputs, genai_config.json)
rather than trusting what the build reports, and ONNX Runtime GenAI loads the folder and
generates.
"""

from __future__ import annotations

import collections
import json

import onnx
import pytest
from click.testing import CliRunner

from mobile_export.bundle import read_manifest, sha256_file
from mobile_export.cli import main

ARCHS = ("llama", "phi3", "qwen2", "qwen3", "gemma2")


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir):
    return {arch: tiny_model_dir(arch) for arch in ARCHS}


def _build(folder, out, *extra: str, target: str = "android"):
    # 128 tokens: the tiny Phi-3's longrope switches to its long factors past 128 positions
    args = ["build", "--model-path", str(folder), "--target", target, "--backend", "onnx", "--context-length", "128"]
    # --no-eval: fidelity on text is tested in test_fidelity_e2e; here it would only add time
    return CliRunner().invoke(main, [*args, "-o", str(out), "--quiet", "--no-eval", *extra], catch_exceptions=False)


def _graph(bundle):
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return model, ops


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# arch, scheme, embedding (None: the backend's default for the scheme)
CASES = [
    ("llama", "int4", None),  # tied embedding: the LM head's int4 blocks serve the lookup too
    ("llama", "fp16", "none"),
    ("qwen2", "int8", "int4"),  # q/k/v biases, untied head: 8-bit linears, 4-bit embedding table
    ("phi3", "int4", None),  # fused qkv/gate_up, partial rotary too narrow for the fused rotary
    ("qwen3", "fp32", "none"),  # per-head q/k norms: q, k, v stay separate inputs
    ("gemma2", "int4", None),  # softcapping, sliding window, query_pre_attn_scalar
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,scheme,embedding", CASES)
def test_onnx_bundle(model_dirs, tmp_path, arch, scheme, embedding):
    extra = ["--quant", scheme] + (["--embedding-quant", embedding] if embedding else [])
    result = _build(model_dirs[arch], tmp_path, *extra)
    assert result.exit_code == 0, result.output
    bundle = tmp_path / f"tiny-{arch}-android-onnx"
    manifest = read_manifest(bundle)
    assert manifest.backend == "onnx" and manifest.artifact["format"] == "onnxruntime-genai"
    for entry in manifest.files:
        assert sha256_file(bundle / entry.path) == entry.sha256
    names = {f.path for f in manifest.files}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= names
    assert manifest.tokenizer.files == sorted(n for n in names if n.startswith("tokenizer") or n.startswith("special"))

    model, ops = _graph(bundle)
    n_layers = 2
    assert ops["GroupQueryAttention"] == n_layers
    assert ops["SkipSimplifiedLayerNormalization"] >= n_layers
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs[:2] == ["input_ids", "attention_mask"]
    assert inputs[2:] == [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    assert [i.name for i in manifest.inputs] == inputs and [o.name for o in manifest.outputs] == outputs

    gqa = [_attrs(n) for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if arch == "phi3":  # rotary half-width 4 is not a multiple of 8: rope runs before the op
        assert all(a["do_rotary"] == 0 for a in gqa)
        assert manifest.artifact["rotary_in_attention"] is False
        assert any("rotary" in m for m in manifest.artifact["fusions_missing"])
    else:
        assert all(a["do_rotary"] == 1 for a in gqa)
    if arch == "gemma2":
        assert all(a["softcap"] == 50.0 for a in gqa)
        assert sorted(a["local_window_size"] for a in gqa) == [-1, 16]  # sliding and global layers
        assert manifest.artifact["min_onnxruntime"] == "1.20"

    nbits = [_attrs(n) for n in model.graph.node if n.op_type == "MatMulNBits"]
    linears_per_layer = 7 if arch == "qwen3" else 5  # q, k, v separate with q/k norms; else packed qkv
    if scheme in ("int4", "int8"):
        assert len(nbits) == n_layers * linears_per_layer + 1  # + the LM head
        assert {a["bits"] for a in nbits} == {4 if scheme == "int4" else 8}
        assert {a["block_size"] for a in nbits} == {32} and {a["accuracy_level"] for a in nbits} == {4}
        assert ops["MatMul"] == 0
    else:
        assert not nbits and ops["MatMul"] >= n_layers * linears_per_layer
    initializers = {t.name: t for t in model.graph.initializer}
    if scheme == "fp16":
        halves = [t for t in initializers.values() if t.data_type == onnx.TensorProto.FLOAT16 and len(t.dims) == 2]
        assert len(halves) >= n_layers * linears_per_layer
    if arch == "llama" and scheme == "int4":
        assert manifest.artifact["tied_embedding_shared"] is True
        lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
        head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and _attrs(n)["N"] == 1024)
        assert lookup.input[2] == head.input[2]  # the same scales: one table for both
        assert not [t for t in initializers.values() if list(t.dims) == [1024, 64]]  # no fp32 table left
    if arch == "qwen2":
        lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
        assert _attrs(lookup).get("bits", 4) == 4 and manifest.artifact["tied_embedding_shared"] is False
    if arch == "llama" and scheme == "fp16":  # tied: the head reads the embedding table (transposed)
        head = next(n for n in model.graph.node if n.op_type == "FusedMatMul")
        assert _attrs(head)["transB"] == 1
        assert not [t for t in initializers.values() if list(t.dims) == [64, 1024]]

    config = json.loads((bundle / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["context_length"] == 128 and config["search"]["past_present_share_buffer"] is True
    assert decoder["num_hidden_layers"] == n_layers and decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert config["model"]["eos_token_id"] in (1, [1])

    comparisons = {c["name"]: c for c in manifest.verification["comparisons"]}
    assert [c["failures"] for c in comparisons.values() if c["enforced"] and not c["passed"]] == []
    if scheme in ("fp32", "fp16") and embedding == "none":
        parity = next(c for name, c in comparisons.items() if name.startswith("parity"))
        assert parity["max_abs_rel"] < (1e-3 if scheme == "fp32" else 2e-2)
    else:
        graph_parity = comparisons["graph parity (fp32 ONNX before quantization vs original)"]
        assert graph_parity["max_abs_rel"] < 1e-3 and graph_parity["min_cosine"] > 0.9999
    assert manifest.verification["onnxruntime_genai"]["status"].startswith("ok")
    bits = manifest.quantization["bits_per_weight"]
    # tiny models: the graph itself and per-block scales weigh a lot next to 100k weights
    assert {"int4": 4.5 < bits < 10, "int8": 8 < bits < 13, "fp16": 16 < bits < 22, "fp32": 32 < bits < 38}[scheme], bits


V_PROJ = r"re:layers\.\d+\.self_attn\.v_proj"
GATE_UP = r"re:layers\.\d+\.mlp\.(gate|up)_proj"


@pytest.mark.slow
def test_onnx_layers_take_their_own_bits_and_blocks(model_dirs, tmp_path):
    """--keep-8bit and --group-size-for on ONNX: every v_proj and the last down_proj are 8-bit
    MatMulNBits, gate/up use blocks of 64, the rest 4 bits in blocks of 32; q, k and v become three
    matmuls (GroupQueryAttention's unpacked inputs) and the tied table is still stored once, in the
    embedding's blocks of 64."""
    extra = ["--keep-8bit", V_PROJ, "--keep-8bit", "layers.{last}.mlp.down_proj", "--group-size-for", f"{GATE_UP}=64",
             "--embedding-group-size", "64"]  # fmt: skip
    result = _build(model_dirs["llama"], tmp_path, "--quant", "int4", *extra)
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "tiny-llama-android-onnx"
    model, ops = _graph(bundle)
    nbits = {n.output[0]: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    tables = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    assert len(attention) == 2 and ops["GatherBlockQuantized"] == 1 and ops["Reshape"] == 1  # the shared table's
    assert not [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables]
    for node in attention:
        q, k, v = (nbits[name] for name in node.input[:3])  # three projections, each quantized
        assert [_attrs(m)["bits"] for m in (q, k, v)] == [4, 4, 8]
        assert {_attrs(m)["block_size"] for m in (q, k, v)} == {32}
    by_shape = collections.defaultdict(list)
    for node in nbits.values():
        attrs = _attrs(node)
        by_shape[(attrs["K"], attrs["N"])].append((attrs["bits"], attrs["block_size"]))
    assert sorted(by_shape[(64, 128)]) == [(4, 64)] * 4  # gate and up, both layers
    assert sorted(by_shape[(128, 64)]) == [(4, 32), (8, 32)]  # down_proj: layer 0, then the last
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in nbits.values() if _attrs(n)["N"] > 128)  # the vocabulary-wide head
    assert _attrs(lookup)["block_size"] == _attrs(head)["block_size"] == 64 and _attrs(head)["bits"] == 4
    manifest = read_manifest(bundle)
    quantization = manifest.quantization
    assert quantization["keep_8bit"]["layers"] == [
        "layers.0.self_attn.v_proj", "layers.1.self_attn.v_proj", "layers.1.mlp.down_proj"
    ]  # fmt: skip
    assert quantization["group_sizes"] == {GATE_UP: 64}
    assert quantization["qkv_split_layers"] == [0, 1]
    assert quantization["nodes"] == {"4-bit b32": 7, "4-bit b64": 5, "8-bit b32": 3}  # q, k, o x2, down 0; gate/up, lm_head
    assert manifest.artifact["tied_embedding_shared"] is True
    assert all(c["passed"] for c in manifest.verification["comparisons"] if c["enforced"])


@pytest.mark.slow
def test_onnx_softcapped_head_kept_at_8_bits_shares_its_table(model_dirs, tmp_path):
    """Gemma 2's LM head comes out of onnxscript's fusions without a module name (a FusedMatMul
    unfused again); it is still found, by its vocabulary width, for --keep-8bit lm_head, and the
    tied embedding then reads its 8-bit blocks."""
    result = _build(model_dirs["gemma2"], tmp_path, "--keep-8bit", "lm_head")
    assert result.exit_code == 0, result.output
    model, _ = _graph(tmp_path / "tiny-gemma2-android-onnx")
    nbits = [_attrs(n) for n in model.graph.node if n.op_type == "MatMulNBits"]
    lookup = next(_attrs(n) for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = [a for a in nbits if a["N"] == 1024]  # the vocabulary
    assert len(head) == 1 and head[0]["bits"] == 8 and lookup["bits"] == 8
    assert {a["bits"] for a in nbits if a["N"] != 1024} == {4}


@pytest.fixture(scope="module")
def llama_int4(model_dirs, build_bundle):
    args = ["--model-path", model_dirs["llama"], "--target", "ios", "--backend", "onnx", "--context-length", "128"]
    return build_bundle(*args, "--no-eval").bundle


@pytest.mark.slow
def test_run_and_genai_generate_agree(llama_int4):
    from transformers import AutoTokenizer

    from mobile_export.generate import generate
    from mobile_export.runtimes.onnx import OnnxRuntime, genai_generate

    tokenizer = AutoTokenizer.from_pretrained(str(llama_int4))
    prompt = list(tokenizer("The bread rises while the oven")["input_ids"])
    runtime = OnnxRuntime(llama_int4 / "model.onnx")
    ours = generate(runtime.step, prompt, 12, set(), runtime.max_seq_len).tokens
    theirs, timings = genai_generate(llama_int4, prompt, 12)
    assert theirs == ours and len(ours) == 12
    assert timings["load_s"] > 0 and timings["decode_s"] > 0
    # a chunk after a prefix steps the same cache as token-by-token decoding
    runtime.step(prompt, 0)
    chunked = runtime.step(ours[:3], len(prompt))
    runtime.step(prompt, 0)
    for i, token in enumerate(ours[:3]):
        stepped = runtime.step([token], len(prompt) + i)
    assert (chunked - stepped).abs().max() < 1e-4

    result = CliRunner().invoke(main, ["run", str(llama_int4), "--prompt", "Once upon a time", "-n", "8"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Once upon a time") and len(result.output) > len("Once upon a time\n")


@pytest.mark.slow
def test_host_device_measures_onnx_bundle(llama_int4):
    from mobile_export.devicelab.harness import measure

    figures = measure(llama_int4, [5, 6, 7, 8, 9, 10, 11, 12], 16, warmup=1)
    assert figures["backend"] == "onnx" and figures["generated_tokens"] == 16
    assert figures["prefill_tokens_per_s"] > 0 and figures["decode_tokens_per_s"] > 0
    assert figures["peak_memory_bytes"] > figures["rss_before_load_bytes"] > 0


@pytest.mark.slow
def test_wrong_fused_attention_fails_verification(model_dirs, tmp_path, monkeypatch):
    """A fused op with a wrong attribute (here the attention scale) fails the build; nothing is written."""
    from mobile_export import modeling

    original = modeling.OnnxAttention.__init__

    def wrong_scale(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.scaling *= 1.5

    monkeypatch.setattr(modeling.OnnxAttention, "__init__", wrong_scale)
    result = CliRunner().invoke(
        main,
        ["build", "--model-path", str(model_dirs["llama"]), "-t", "android", "--backend", "onnx", "--quant", "fp32",
         "--embedding-quant", "none", "--context-length", "64", "-o", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "verification failed" in result.output and "parity" in result.output
    assert not (tmp_path / "tiny-llama-android-onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--quant", "8da4w"], "backend 'onnx' cannot do quantization '8da4w'"),
        (
            ["--quant", "fp32", "--embedding-quant", "none", "--min-onnxruntime", "1.16"],
            "ONNX Runtime 1.16 is too old for GroupQueryAttention (added in 1.17)",
        ),
        (["--quant", "int4", "--min-onnxruntime", "1.18"], "too old for GatherBlockQuantized (added in 1.20)"),
        (["--min-onnxruntime", "latest"], "--min-onnxruntime 'latest' is not a version"),
        (["--opset", "17"], "opset 17 is too old for the ONNX export"),
        (["--embedding-quant", "int8"], "backend 'onnx' cannot store embeddings as int8"),
        (["--quant-algo", "gptq", "--calib-text", "README.md"], "--quant-algo gptq is not available for backend onnx"),
        (["--compute-units", "all"], "backend 'onnx' takes no --compute-units"),
        (["--group-size-for", "layers.0.mlp"], "--group-size-for 'layers.0.mlp' is not PATTERN=N"),
        (["--group-size-for", "layers.0.*=48"], "unsupported group size 48"),
        (["--group-size-for", "decoder.*=64"], "--group-size-for 'decoder.*' matches no layer"),
        (["--keep-8bit", "embed_tokens"], "backend 'onnx' cannot keep embed_tokens at 8 bits"),
        (["--embedding-group-size", "48"], "backend 'onnx' cannot use --embedding-group-size 48"),
    ],
)
def test_onnx_bad_input(tmp_path, extra, message):
    result = CliRunner().invoke(
        main, ["build", "demo", "-t", "android", "--backend", "onnx", "-o", str(tmp_path), *extra]
    )
    assert result.exit_code != 0
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and message in line
    assert list(tmp_path.iterdir()) == []


def test_onnx_options_on_other_backends(tmp_path):
    result = CliRunner().invoke(main, ["build", "demo", "-t", "android", "--opset", "18", "-o", str(tmp_path)])
    assert result.exit_code != 0
    assert "backend 'xnnpack' takes no --opset" in result.output and "only the onnx backend" in result.output
    result = CliRunner().invoke(main, ["build", "demo", "-t", "android", "--group-size-for", "lm_head=64"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("error: --group-size-for is not available for backend xnnpack")
