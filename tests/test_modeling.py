"""The export wrapper against the original transformers model, eagerly (no export): fast parity.

Every supported family is checked: the wrapper's prefill + cached decode steps must give the
logits of one full causal forward of the original model.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from mobile_export.errors import UserError
from mobile_export.families import model_types
from mobile_export.modeling import SUPPORTED_MODEL_TYPES, ExportableDecoder, check_supported

# Every registered family, each with its record's tiny config (tests/tiny_models.py).
ARCHS = list(model_types())


def test_every_supported_type_is_tested():
    assert sorted(ARCHS) == sorted(SUPPORTED_MODEL_TYPES)
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"} <= set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "prepared,attention",
    [(False, "executorch"), (True, "executorch"), (True, "portable")],
    ids=["hf-norms", "export-norms", "portable-attention"],
)
def test_cached_steps_match_full_forward(arch, prepared, attention):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(2, model.config.vocab_size, (40,), generator=gen).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0, 23:].float()
    decoder = ExportableDecoder(model, max_seq_len=64, attention=attention).eval()
    if prepared:
        decoder.prepare_for_export()
    # prefill 24 tokens, then 16 single-token decode steps: window (16) < positions < context (64)
    rows = [decoder.step(seq[:24], 0)] + [decoder.step([seq[pos]], pos) for pos in range(24, 40)]
    got = torch.stack(rows).float()
    assert got.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0.5, "logits too flat to test anything"
    torch.testing.assert_close(got, ref, atol=2e-4 * scale, rtol=0)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_export_norms_replace_every_rmsnorm():
    decoder = ExportableDecoder(tiny_model("gemma3_text"), max_seq_len=32)
    decoder.prepare_for_export()
    leftover = [
        name
        for name, m in decoder.named_modules()
        if type(m).__name__.endswith("RMSNorm") and "Export" not in type(m).__name__
    ]
    assert leftover == []


def test_fused_projections_are_split():
    decoder = ExportableDecoder(tiny_model("phi3"), max_seq_len=32)
    attn = decoder.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * 16 and attn.k_proj.out_features == 2 * 16
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n, _ in decoder.named_modules())


def test_unsupported_architecture_is_refused():
    import transformers

    with pytest.raises(UserError) as info:
        check_supported(transformers.GPT2Config())
    assert "unsupported architecture 'gpt2'" in info.value.one_line()
    assert "llama" in info.value.one_line() and "phi3" in info.value.one_line()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_core_ml_entry_positions_come_from_input_shapes(arch):
    """CoreMLEntry feeds tokens at ``end - T``: prefill then decode through it equals eager steps."""
    from mobile_export.modeling import CoreMLEntry, additive_causal_mask

    model = tiny_model(arch)
    seq = torch.randint(2, model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = ExportableDecoder(tiny_model(arch), max_seq_len=48, attention="portable").eval()
    expected = [ref.step(seq[:20], 0)] + [ref.step([seq[p]], p) for p in range(20, 30)]
    entry = CoreMLEntry(ExportableDecoder(model, max_seq_len=48, attention="portable").eval())
    got = []
    with torch.no_grad():
        got.append(entry(torch.tensor([seq[:20]]), additive_causal_mask(0, 20, 20))[0])
        for p in range(20, 30):
            got.append(entry(torch.tensor([[seq[p]]]), additive_causal_mask(p, 1, p + 1))[0])
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi3"])
def test_static_rope_rows_are_computed_in_the_graph_not_stored(arch):
    """ExecuTorch decoders drop a static rope's cos/sin tables (2 x context x head_dim fp32 each)
    and compute the rows from the frequencies; the rows equal the tables' at every position. A
    rope the frequencies cannot rebuild (the tiny Phi-3's partial rotary) keeps its table."""
    model = tiny_model(arch)
    stored = ExportableDecoder(model, max_seq_len=64, attention="portable")
    computed = ExportableDecoder(model, max_seq_len=64, attention="executorch")
    tables = [n for n, _ in computed.named_buffers() if n.endswith(("_cos", "_sin"))]
    if arch == "phi3":
        assert tables and not computed._rope_scaling
        return
    assert not tables and set(computed._rope_scaling) == set(computed._rope_keys)
    for key in set(computed._rope_keys):
        for start, seq in ((0, 64), (37, 5), (63, 1)):
            cos, sin = computed._rope_rows(key, start, seq)
            assert torch.allclose(cos, getattr(stored, f"{key}_cos")[start : start + seq], atol=1e-5, rtol=0)
            assert torch.allclose(sin, getattr(stored, f"{key}_sin")[start : start + seq], atol=1e-5, rtol=0)
