"""The family registry (mobile_export/families): every list derives from it, every record tells
the truth about its transformers modules, and an unregistered model type is refused clearly.

The parity of each registered family's tiny model against transformers' own eager logits is
``tests/test_modeling.py::test_cached_steps_match_full_forward`` (its ARCHS are the registry's).
"""

from __future__ import annotations

import inspect
import pkgutil

import pytest
import torch
import transformers
from tiny_models import tiny_config, tiny_model

from mobile_export import families
from mobile_export.backends.genai_config import GENAI_TYPES, genai_config, genai_type
from mobile_export.errors import UserError
from mobile_export.families import ModelFamily, Window, all_families, family_of, get_family, model_types
from mobile_export.modeling import (
    ATTENTION_KINDS,
    SUPPORTED_MODEL_TYPES,
    ExportableDecoder,
    FullCausal,
    SlidingWindow,
    attention_kind,
)
from mobile_export.modeling.norms import export_norm_of
from mobile_export.quant_algos.rotation import ROTATABLE, check_rotatable

FAMILIES = {family.model_type: family for family in all_families()}


def test_every_list_derives_from_the_registry():
    assert SUPPORTED_MODEL_TYPES == model_types() == tuple(FAMILIES)
    assert ROTATABLE == tuple(t for t, f in FAMILIES.items() if f.rotatable)
    assert GENAI_TYPES == {t: f.genai_type for t, f in FAMILIES.items() if f.genai_type}
    # the order users read in error hints, and what --rotate and GenAI support today
    assert model_types() == ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
    assert ROTATABLE == ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
    assert all(GENAI_TYPES[t] == t for t in model_types())


def test_every_family_module_is_listed():
    found = {m.name for m in pkgutil.iter_modules(families.__path__)}
    assert found == set(families.FAMILY_MODULES)


def test_records_are_frozen():
    family = get_family("llama")
    with pytest.raises(AttributeError):
        family.fused_qkv = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        family.tiny_config["num_attention_heads"] = 8  # type: ignore[index]
    # transformers may rewrite nested config dicts: each caller gets its own copy
    args = get_family("phi3").tiny_config_arguments()
    args["rope_scaling"]["type"] = "changed"
    assert get_family("phi3").tiny_config["rope_scaling"]["type"] == "longrope"
    with pytest.raises(ValueError, match="everywhere"):
        ModelFamily(model_type="x", genai_type=None, tiny_config={}, sliding_window="everywhere")


def test_a_model_type_registered_twice_is_refused(monkeypatch):
    monkeypatch.setattr(families, "FAMILY_MODULES", ("llama", "qwen", "llama"))
    with pytest.raises(ValueError, match="model type 'llama' is registered twice"):
        families._registry.__wrapped__()


@pytest.mark.parametrize("model_type", ["gpt2", None, "Llama"])
def test_an_unregistered_model_type_is_refused_naming_the_registered_ones(model_type):
    with pytest.raises(UserError) as info:
        get_family(model_type)
    line = info.value.one_line()
    assert f"unsupported architecture '{model_type}'" in line
    assert "supported model types: " + ", ".join(model_types()) in line


def test_the_decoder_refuses_an_unregistered_model_type():
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    )
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        ExportableDecoder(model, max_seq_len=16)
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        genai_type("gpt2")
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        tiny_config("gpt2")


def test_a_family_without_a_genai_type_is_refused_not_written_as_llama(monkeypatch):
    plain = ModelFamily(model_type="newfamily", genai_type=None, tiny_config={})
    monkeypatch.setattr(families, "_registry", lambda: {**dict(FAMILIES), "newfamily": plain})
    with pytest.raises(UserError) as info:
        genai_config(
            "newfamily", n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, hidden_size=8, vocab_size=8,
            context_length=8, bos_id=None, eos_ids=[1], pad_id=None,
        )  # fmt: skip
    assert "ONNX Runtime GenAI has no model type for 'newfamily'" in info.value.one_line()
    config = genai_config(
        "qwen3", n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, hidden_size=8, vocab_size=8,
        context_length=8, bos_id=None, eos_ids=[1], pad_id=None,
    )  # fmt: skip
    assert config["model"]["type"] == "qwen3"


def test_rotation_support_comes_from_the_record():
    for family in all_families():
        config = tiny_config(family.model_type)
        if family.rotatable:
            check_rotatable(config)
        else:
            with pytest.raises(UserError, match="--rotate does not fold exactly"):
                check_rotatable(config)


@pytest.mark.parametrize("model_type", model_types())
def test_the_record_tells_the_truth_about_its_transformers_modules(model_type):
    """Each quirk the record states is what the tiny transformers model has (and no more): the
    check that catches a transformers release changing a family under the wrapper."""
    family = get_family(model_type)
    model = tiny_model(model_type)
    config, base = model.config, model.model
    assert config.model_type == model_type and family_of(config) is family
    layer = base.layers[0]
    attn = layer.self_attn
    assert family.fused_qkv == hasattr(attn, "qkv_proj")
    assert family.fused_gate_up == hasattr(layer.mlp, "gate_up_proj")
    assert family.qk_norm == (getattr(attn, "q_norm", None) is not None)
    assert family.sandwich_norms == hasattr(layer, "pre_feedforward_layernorm")
    assert family.scaled_embeddings == hasattr(base.embed_tokens, "embed_scale")
    assert family.attention_softcap == hasattr(attn, "attn_logit_softcapping")
    assert family.final_softcap == hasattr(config, "final_logit_softcapping")
    takes_layer_type = "layer_type" in inspect.signature(base.rotary_emb.forward).parameters
    assert family.rope_by_layer_type == takes_layer_type
    other_offset = 1.0 - family.norm_offset
    assert export_norm_of(layer.input_layernorm, family.norm_offset) is not None
    assert export_norm_of(layer.input_layernorm, other_offset) is None
    for index, hf_layer in enumerate(base.layers):
        window = family.window_of_layer(config, index)
        if family.sliding_window == Window.LAYER_TYPES:
            assert window == hf_layer.self_attn.sliding_window
        else:
            assert window is None and getattr(hf_layer.self_attn, "sliding_window", None) is None


def test_attention_kinds_are_looked_up_once_by_name():
    assert ATTENTION_KINDS == ("executorch", "portable", "onnx")
    assert [attention_kind(name).name for name in ATTENTION_KINDS] == list(ATTENTION_KINDS)
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_kind("coreml")
    with pytest.raises(ValueError, match="attention must be one of"):
        ExportableDecoder(tiny_model("llama"), max_seq_len=16, attention="coreml")


@pytest.mark.parametrize("attention", ["executorch", "portable", "onnx"])
def test_masking_is_chosen_once_per_layer_from_the_record(attention):
    """Gemma 3's local layers slide over a window shorter than the cache; its global layers, and
    every layer once the window covers the whole cache, attend causally."""
    layer_types = tiny_config("gemma3_text").layer_types
    decoder = ExportableDecoder(tiny_model("gemma3_text"), max_seq_len=64, attention=attention)
    for layer, layer_type in zip(decoder.layers, layer_types, strict=True):
        expected = SlidingWindow(16) if layer_type == "sliding_attention" else FullCausal()
        assert layer.self_attn.masking == expected
        assert layer.self_attn.sliding_window == expected.window
    short = ExportableDecoder(tiny_model("gemma3_text"), max_seq_len=16, attention=attention)
    assert all(layer.self_attn.masking == FullCausal() for layer in short.layers)
    assert {layer.self_attn.softcap for layer in decoder.layers} == {None}
    gemma2 = ExportableDecoder(tiny_model("gemma2"), max_seq_len=64, attention=attention)
    assert {layer.self_attn.softcap for layer in gemma2.layers} == {50.0} and gemma2.final_softcap == 30.0


def test_sliding_window_mask_equals_a_causal_mask_narrowed_to_the_window():
    window = SlidingWindow(4)
    mask, causal = window.sdpa_mask(5, 3, 12)
    assert not causal and mask.shape == (3, 12)
    q = torch.arange(3)[:, None] + 5
    k = torch.arange(12)[None, :]
    expected = ((q - k >= 0) & (q - k < 4)).float().log()  # 0 where allowed, -inf elsewhere
    assert torch.equal(mask, expected)
    assert FullCausal().sdpa_mask(5, 3, 12) == (None, True)
