"""Quantization algorithms at the layer and eager level: GPTQ, AWQ folding, rotations, 8-bit rules, errors.

Fast (no export): single linears, tiny random models wrapped for export, the CLI's refusals.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_model, write_model_dir
from torch import nn

from mobile_export.backends import get_backend
from mobile_export.build import convert
from mobile_export.cli import main
from mobile_export.console import StepUI
from mobile_export.errors import UserError
from mobile_export.modeling import ExportableDecoder
from mobile_export.quant_algos.calibration import DEFAULT_CALIBRATION_TEXT, load_calibration
from mobile_export.quant_algos.gptq import Hessian, gptq_quantize
from mobile_export.quant_algos.grid import dequantize_grouped, group_scales, install_weight, quantize_grouped
from mobile_export.quant_algos.layer_algos import Stage, _fold
from mobile_export.quant_algos.rotation import hadamard, orthogonal
from mobile_export.quantize import QuantReport, QuantSpec, keep_8bit_matcher, quantize_module


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Activations like a transformer's: low-rank structure, a few outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen) @ torch.randn(16, d, generator=gen) + 0.1 * torch.randn(n, d, generator=gen)
    x[:, :3] *= 8.0
    return x


def test_grid_is_torchaos_8da4w_grid():
    """Our round-to-nearest integers and scales are torchao's, and our tensor is the one quantize_ builds."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    ours, theirs = nn.Linear(128, 48, bias=False), nn.Linear(128, 48, bias=False)
    theirs.weight.data = ours.weight.data.clone()
    quantize_(theirs, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    scale = group_scales(ours.weight.detach(), 32, 4)
    install_weight(ours, quantize_grouped(ours.weight.detach(), scale, 32, 4), scale, 32, 4, dynamic_activation=True)
    a, b = ours.weight, theirs.weight
    assert type(a) is type(b)
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert (a.block_size, a.target_dtype, a.activation_quantization) == (
        b.block_size,
        b.target_dtype,
        b.activation_quantization,
    )
    assert int(a.qdata.min()) >= -8 and int(a.qdata.max()) <= 7
    x = torch.randn(5, 128)
    assert torch.equal(ours(x), theirs(x))


def test_round_to_nearest_computes_with_xnnpacks_bf16_group_scales():
    """XNNPACK stores qb4w group scales in bf16: the eager model (lowering parity's reference) must
    compute with those, the integers staying torchao's; 8-bit per-channel scales stay fp32."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    ours = nn.ModuleDict({"a": nn.Linear(128, 48, bias=False), "b": nn.Linear(128, 48, bias=False)})
    theirs = nn.Linear(128, 48, bias=False)
    theirs.weight.data = ours["a"].weight.data.clone()
    quantize_(theirs, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    spec = QuantSpec(scheme="8da4w", group_size=32, keep_8bit=("b",))
    quantize_module(ours, spec, QuantReport(), keep=keep_8bit_matcher(spec.keep_8bit, 1))
    a = ours["a"].weight
    assert torch.equal(a.qdata, theirs.weight.qdata)
    assert torch.equal(a.scale, theirs.weight.scale.to(torch.bfloat16).float())
    assert not torch.equal(a.scale, theirs.weight.scale)  # the rounding did something
    b = ours["b"].weight
    assert b.scale.shape == (48, 1) and not torch.equal(b.scale, b.scale.to(torch.bfloat16).float())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(act_order):
    torch.manual_seed(1)
    x = _correlated_inputs(2048, 128)
    w = torch.randn(64, 128) * 0.05
    hessian = Hessian(128)
    for chunk in x.split(512):  # accumulated in pieces, as calibration windows arrive
        hessian.add(chunk)
    assert torch.allclose(hessian.matrix, 2 * x.double().t() @ x.double() / len(x))
    ref = x @ w.t()
    scale = group_scales(w, 32, 4)
    rtn = ((x @ dequantize_grouped(quantize_grouped(w, scale, 32, 4), scale, 32).t() - ref) ** 2).mean()
    result = gptq_quantize(w, hessian.matrix, 32, 4, act_order=act_order)
    gptq = ((x @ dequantize_grouped(result.qdata, result.scale, 32).t() - ref) ** 2).mean()
    assert result.qdata.dtype == torch.int8 and result.scale.shape == (64, 4)
    assert int(result.qdata.min()) >= -8 and int(result.qdata.max()) <= 7
    assert float(gptq / rtn) < 0.5, f"GPTQ/RTN output MSE {float(gptq / rtn):.3f}"
    # per-channel (one group per row, the 8-bit layers)
    per_channel = gptq_quantize(w, hessian.matrix, 128, 8, act_order=act_order)
    assert per_channel.scale.shape == (64, 1)


@pytest.mark.parametrize("n", [64, 576, 640, 768, 896])  # Sylvester; Paley II (36, 20) and I (12, 28)
def test_rotations_are_orthogonal_hadamards_where_sizes_allow(n):
    found = hadamard(n)
    assert found is not None
    h = found[0]
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.allclose(h @ h.t(), n * torch.eye(n, dtype=torch.float64))
    q, label = orthogonal(n, seed=3)
    assert label.startswith("hadamard") and torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_random_orthogonal_where_no_hadamard_is_built():
    assert hadamard(52) is None
    q, label = orthogonal(52, seed=0)
    assert label == "random orthogonal 52"
    assert torch.allclose(q @ q.t(), torch.eye(52, dtype=torch.float64), atol=1e-12)


def _logits(decoder: ExportableDecoder, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = decoder.run(torch.tensor([ids]), 0, len(ids), all_positions=True)
    decoder.reset_cache()
    return out[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma"])
def test_rotation_keeps_fp32_logits(arch):
    """Norms folded, residual stream and value heads rotated: the same model, to fp32 rounding."""
    ids = list(range(3, 60, 2))
    original = ExportableDecoder(tiny_model(arch), 64).eval()
    rotated, report = convert(
        tiny_model(arch), QuantSpec(scheme="fp32", rotate=True), 64, get_backend("xnnpack"), StepUI(quiet=True)
    )
    ref, got = _logits(original, ids), _logits(rotated, ids)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    assert report.details["rotation"]["residual"] == "hadamard 64"
    # the weights did change: the rotation is not a no-op
    assert not torch.allclose(rotated.layers[0].self_attn.q_proj.weight, original.layers[0].self_attn.q_proj.weight)


def test_rotation_refuses_sandwich_norms():
    with pytest.raises(UserError, match="--rotate does not fold exactly for 'gemma2'"):
        convert(
            tiny_model("gemma2"), QuantSpec(scheme="fp32", rotate=True), 64, get_backend("xnnpack"), StepUI(quiet=True)
        )


def test_awq_folding_keeps_fp32_logits():
    """Channel scales folded into the norm (q/k/v) and into up's rows (down): output unchanged."""
    ids = list(range(5, 45))
    decoder = ExportableDecoder(tiny_model("llama"), 64).eval()
    decoder.prepare_for_export()
    ref = _logits(decoder, ids)
    layer = decoder.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    gen = torch.Generator().manual_seed(0)
    _fold(
        Stage("a", [("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)], layer.input_layernorm, "norm"),
        torch.rand(64, generator=gen) + 0.5,
    )
    _fold(Stage("d", [("down", mlp.down_proj)], mlp.up_proj, "linear"), torch.rand(128, generator=gen) + 0.5)
    assert float((_logits(decoder, ids) - ref).abs().max() / ref.abs().max()) < 1e-5


def test_keep_8bit_patterns():
    keep = keep_8bit_matcher(("lm_head", "layers.{last}.*", "re:layers\\.0\\.mlp\\.(up|down)_proj", "layers.2"), 5)
    assert keep("lm_head") and keep("layers.4.self_attn.q_proj") and keep("layers.0.mlp.down_proj")
    assert keep("layers.2.mlp.gate_proj")  # a module name keeps everything inside it
    assert (
        not keep("layers.0.mlp.gate_proj")
        and not keep("layers.3.self_attn.o_proj")
        and not keep("layers.20.mlp.up_proj")
    )


def test_keep_8bit_quantizes_named_linears_per_channel():
    decoder = ExportableDecoder(tiny_model("qwen2"), 64).eval()
    spec = QuantSpec(scheme="8da4w", group_size=32, keep_8bit=("layers.0.mlp.*",))
    report = QuantReport()
    quantize_module(decoder.layers[0], spec, report, prefix="layers.0.", keep=keep_8bit_matcher(spec.keep_8bit, 2))
    mlp, attn = decoder.layers[0].mlp, decoder.layers[0].self_attn
    assert mlp.down_proj.weight.target_dtype == torch.int8 and mlp.down_proj.weight.block_size == (1, 128)
    assert attn.q_proj.weight.target_dtype == torch.int4 and attn.q_proj.weight.block_size == (1, 32)
    assert report.kept_8bit == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    # int8 rows + fp32 channel scales, minus int4 + bf16 group scales: 64x128 (gate, up) and 128x64 (down)
    per = lambda o, i: o * i + 4 * o - (o * i // 2 + 2 * o * i // 32)  # noqa: E731
    assert report.extra_bytes_8bit == 2 * per(128, 64) + per(64, 128)


def test_quant_spec_refusals():
    with pytest.raises(UserError, match="unknown quantization algorithm 'gtpq'"):
        QuantSpec(algo="gtpq")
    with pytest.raises(UserError, match="--quant-algo gptq needs a quantized scheme, not fp32"):
        QuantSpec(scheme="fp32", algo="gptq")
    with pytest.raises(UserError, match="--keep-8bit has nothing to keep"):
        QuantSpec(scheme="fp32", keep_8bit=("lm_head",))
    with pytest.raises(UserError, match="not a valid regular expression"):
        QuantSpec(keep_8bit=("re:layers.(",))
    assert QuantSpec(algo="gptq", rotate=True, keep_8bit=("lm_head",), embedding="int8").label == (
        "8da4w-g32 gptq + rotate + 8-bit lm_head + emb int8"
    )


def test_calibration_text_errors(tmp_path):
    def encode(text):
        return list(range(len(text.split())))

    shipped = load_calibration(None, encode, "gptq", 256, 1024)  # the package's broad calibration text
    assert shipped.path == DEFAULT_CALIBRATION_TEXT and shipped.tokens >= 1024
    with pytest.raises(UserError, match="does not exist"):
        load_calibration(tmp_path / "missing.txt", encode, "gptq", 256, 1024)
    short = tmp_path / "short.txt"
    short.write_text("word " * 300)
    with pytest.raises(UserError, match=r"has 300 tokens; --quant-algo awq needs at least 1024"):
        load_calibration(short, encode, "awq", 256, 1024)
    long = tmp_path / "long.txt"
    long.write_text("word " * 2070)
    calibration = load_calibration(long, encode, "gptq", 128, 1024)
    assert calibration.tokens == 2048 and {len(w) for w in calibration.windows} == {128}  # a 22-token scrap dropped


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["build", *args, "--quiet"])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quant-algo", "awq", "--calib-text", "/no/such.txt"], "calibration text /no/such.txt does not exist"),
        (["--quant-algo", "sparsegpt"], "unknown quantization algorithm 'sparsegpt'"),
        (["--quant", "fp32", "--quant-algo", "awq"], "--quant-algo awq needs a quantized scheme, not fp32"),
        (["--target", "ios", "--quant", "palettize4", "--quant-algo", "hqq"], "hqq is not available for coreml palettize4"),
        (["--target", "ios", "--quant", "fp16", "--keep-8bit", "lm_head"], "--keep-8bit has nothing to keep"),
        (["--target", "ios", "--quant", "palettize6", "--keep-8bit", "lm_head"], "not available for coreml palettize6"),
        (["--keep-8bit", "lm_head", "--group-size-for", "lm_head=64"], "--group-size-for is not available for backend xnnpack"),
        (["--backend", "onnx", "--quant", "int8", "--group-size-for", "lm_head=64"], "no groups to size with --quant int8"),
    ],
)
def test_cli_refuses_before_loading(tmp_path, args, message):
    target = [] if "--target" in args else ["--target", "android"]
    code, out = _cli(["demo", *target, *args, "-o", str(tmp_path)])
    assert code == 2 and message in out, out


def test_cli_refuses_short_calibration_text_and_unmatched_pattern(tmp_path):
    short = tmp_path / "calib.txt"
    short.write_text("def f(x):\n    return x\n" * 20)
    code, out = _cli(
        [
            "demo",
            "--target",
            "android",
            "--random-weights",
            "--quant-algo",
            "gptq",
            "--calib-text",
            str(short),
            "-o",
            str(tmp_path),
        ]
    )
    assert code == 2 and "tokens; --quant-algo gptq needs at least 1024" in out, out
    assert not (tmp_path / "demo-android").exists()
    code, out = _cli(["demo", "--target", "android", "--keep-8bit", "layers.9.*", "-o", str(tmp_path)])
    assert code == 2 and "--keep-8bit 'layers.9.*' matches no layer" in out, out


def test_cli_refuses_rotation_for_gemma2(tmp_path):
    folder = write_model_dir(tmp_path / "tiny-gemma2", "gemma2", trained=False)
    code, out = _cli(["--model-path", str(folder), "--target", "android", "--rotate", "-o", str(tmp_path / "dist")])
    assert code == 2 and "--rotate does not fold exactly for 'gemma2'" in out, out


def test_coreml_converter_stores_our_integers_and_scales():
    """Weights quantized before conversion carry coremltools' compression info: ct.convert stores
    exactly those int4 values and (fp16) scales instead of re-quantizing."""
    import numpy as np

    from mobile_export.backends.coreml import import_coremltools, quiet_coremltools
    from mobile_export.quant_algos.grid import attach_coreml_quantization

    ct = import_coremltools()
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    scale = group_scales(linear.weight.detach(), 32, 4).half().float()
    qdata = quantize_grouped(linear.weight.detach() * 1.3, scale, 32, 4)  # not what rounding the weight gives
    attach_coreml_quantization(linear, qdata, scale, 32, 4)
    traced = torch.jit.trace(nn.Sequential(linear).eval(), torch.randn(1, 64))
    with quiet_coremltools():
        model = ct.convert(
            traced,
            inputs=[ct.TensorType(name="x", shape=(1, 64))],
            minimum_deployment_target=ct.target.iOS18,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,
        )
    ops = model._mil_program.functions["main"].operations
    stored = next(op for op in ops if op.op_type == "constexpr_blockwise_shift_scale")
    assert np.array_equal(stored.inputs["data"].val.astype(np.int8), qdata.numpy())
    assert np.array_equal(stored.inputs["scale"].val.astype(np.float32), scale.numpy())


def test_layer_sensitivity_ranks_groups_and_restores_the_model(trained_model):
    import transformers
    from trained_model import heldout_text

    from mobile_export.fidelity import eager_logits, eager_reference
    from mobile_export.quant_algos.sensitivity import layer_sensitivity

    model = transformers.AutoModelForCausalLM.from_pretrained(str(trained_model), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(trained_model))
    ids = tokenizer(heldout_text())["input_ids"][:512]
    reference = eager_reference(model, ids, 128)
    before = eager_logits(model, ids, 128)
    spec = QuantSpec(scheme="8da4w", group_size=32, embedding="int4")
    groups = layer_sensitivity(model, spec, reference)
    assert {g.group for g in groups} == {"embed_tokens", "layers.0", "layers.1", "layers.2", "layers.3", "lm_head"}
    assert [g.kl_mean for g in groups] == sorted((g.kl_mean for g in groups), reverse=True)
    assert all(0 < g.kl_mean < 0.05 and g.kl_p99 >= g.kl_mean for g in groups)
    layer = next(g for g in groups if g.group == "layers.0")
    assert layer.parameters == 2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 384  # q, o; k, v (2 kv heads); MLP
    assert layer.extra_bytes_8bit > 0 and next(g for g in groups if g.group == "embed_tokens").extra_bytes_8bit > 0
    assert torch.equal(eager_logits(model, ids, 128), before)  # every group restored
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_recipe_sets_algorithm_defaults_and_the_command_line_overrides():
    from pydantic import ValidationError

    from mobile_export.build import BuildRequest, quant_spec
    from mobile_export.recipes import QuantSettings, TargetSettings, recipe_from_model_config

    with pytest.raises(ValidationError, match="algo"):
        QuantSettings(scheme="8da4w", algo="gtpq")
    recipe = recipe_from_model_config(tiny_model("llama").config.to_dict(), "tiny")
    android = TargetSettings(
        backend="xnnpack", quant=QuantSettings(scheme="8da4w", algo="hqq", rotate=True, keep_8bit=["lm_head"])
    )
    recipe = recipe.model_copy(update={"targets": {**recipe.targets, "android": android}})
    backend = get_backend("xnnpack")
    spec = quant_spec(recipe, BuildRequest(recipe=None, target="android"), backend)
    assert (spec.algo, spec.rotate, spec.keep_8bit) == ("hqq", True, ("lm_head",))
    request = BuildRequest(recipe=None, target="android", quant_algo="rtn", rotate=False, keep_8bit=("layers.0.*",))
    spec = quant_spec(recipe, request, backend)
    assert (spec.algo, spec.rotate, spec.keep_8bit) == ("rtn", False, ("layers.0.*",))


def test_sensitivity_stand_ins_for_bundle_schemes():
    from mobile_export.quant_algos.sensitivity import spec_for_bundle

    spec, notes = spec_for_bundle(
        {"scheme": "8da4w", "group_size": 64, "embedding": "int8", "algorithm": "gptq", "rotate": True}, "xnnpack"
    )
    assert (spec.scheme, spec.group_size, spec.algo, spec.dynamic_activation) == ("8da4w", 64, "rtn", True)
    assert "round-to-nearest" in notes[0] and "rotation" in notes[1]
    spec, notes = spec_for_bundle(
        {"scheme": "int4", "group_size": 32, "embedding": "int4 (shared with the LM head)"}, "coreml"
    )
    assert (spec.embedding, spec.dynamic_activation) == ("int4", False) and "coreml" in notes[0]
    with pytest.raises(UserError, match="no eager stand-in for scheme palettize4"):
        spec_for_bundle({"scheme": "palettize4"}, "coreml")
    with pytest.raises(UserError, match="the bundle is fp32"):
        spec_for_bundle({"scheme": "fp32"}, "xnnpack")


def test_int4_embedding_has_its_own_group_size():
    from mobile_export.quantize import quantize_embedding

    table = nn.Embedding(100, 192)
    original = table.weight.detach().clone()
    spec = QuantSpec(scheme="8da4w", group_size=32, embedding="int4", embedding_group_size=96)
    assert spec.embedding_groups == 96 and spec.label.endswith("emb int4 g96")
    quantize_embedding(table, spec, QuantReport())
    assert tuple(table.weight.scale.shape) == (100, 2)  # one scale per 96 columns, not per 32
    error = (table.weight.dequantize() - original).abs().amax(dim=1)
    assert bool((error <= original.abs().amax(dim=1) / 7.5 * 0.5 + 1e-6).all())  # half a step of each row's grid
    assert QuantSpec(embedding="int4").embedding_groups == 32  # default: the linears' group size
    with pytest.raises(UserError, match="needs --embedding-quant int4"):
        QuantSpec(embedding="int8", embedding_group_size=64)
    with pytest.raises(UserError, match="not a multiple of group size 80"):
        quantize_embedding(nn.Embedding(10, 192), QuantSpec(embedding="int4", embedding_group_size=80), QuantReport())


def test_recipe_embedding_groups_apply_until_the_command_line_changes_the_embedding():
    from mobile_export.build import BuildRequest, quant_spec
    from mobile_export.recipes import QuantSettings, TargetSettings, recipe_from_model_config

    recipe = recipe_from_model_config(tiny_model("llama").config.to_dict(), "tiny")
    android = TargetSettings(
        backend="xnnpack", quant=QuantSettings(scheme="8da4w", embedding="int4", embedding_group_size=64)
    )
    recipe = recipe.model_copy(update={"targets": {**recipe.targets, "android": android}})
    backend = get_backend("xnnpack")

    def groups(**request) -> int | None:
        return quant_spec(recipe, BuildRequest(recipe=None, target="android", **request), backend).embedding_group_size

    assert groups() == 64
    assert groups(embedding_group_size=128) == 128
    assert groups(group_size=64) is None  # the user's --group-size then sets the table's groups too
    assert groups(embedding_quant="int8") is None
    # onnx: the blocks of its (shared) 4-bit table
    onnx = quant_spec(recipe, BuildRequest(recipe=None, target="android", embedding_group_size=64), get_backend("onnx"))
    assert onnx.embedding == "int4" and onnx.embedding_group_size == 64


def test_recipe_tuning_holds_for_its_own_scheme_only():
    """A recipe's algorithm, 8-bit layers and per-layer groups were chosen for its scheme: another
    --quant builds without them instead of failing (fp32 has nothing to keep) or mislabelling."""
    from mobile_export.build import BuildRequest, quant_spec, resolve_recipe

    def spec(backend: str, **request) -> QuantSpec:
        req = BuildRequest(recipe="smollm2-135m", target="android", backend=backend, **request)
        return quant_spec(resolve_recipe(req), req, get_backend(backend))

    default = spec("xnnpack")
    assert default.algo == "hqq" and default.keep_8bit
    fp32 = spec("xnnpack", quant="fp32")
    assert fp32.algo == "rtn" and not fp32.keep_8bit
    onnx = spec("onnx")  # the recipe's backend_quant entry for onnx
    assert onnx.keep_8bit and dict(onnx.group_sizes) == {r"re:layers\.\d+\.mlp\.(gate|up)_proj": 64}
    int8 = spec("onnx", quant="int8")
    assert not int8.keep_8bit and not int8.group_sizes
    assert spec("onnx", group_size=64).group_sizes == ()  # --group-size sets every layer's blocks
