"""A hand-built bundle manifest for tests that need one without running a build."""

from __future__ import annotations

from mobile_export.bundle import Manifest, ModelInfo, TensorSpec, TokenizerInfo


def make_manifest(**overrides) -> Manifest:
    """A manifest with every required field, as a build would write it (files filled in later).

    Keyword arguments replace fields.
    """
    fields = dict(
        created_at="2025-01-01T00:00:00+00:00",
        tool={"name": "mobile-export", "version": "0.1.0"},
        versions={"python": "3.11.0", "torch": "2.14.1"},
        model=ModelInfo(name="demo", architecture="llama", parameters=1_000_000, weights="random"),
        recipe={"name": "demo", "sha256": "0" * 64},
        target="android",
        backend="xnnpack",
        artifact={"file": "model.pte", "format": "executorch-pte"},
        quantization={"scheme": "8da4w", "group_size": 32, "embedding": "int8", "bits_per_weight": 4.5},
        context_length=512,
        inputs=[
            TensorSpec(name="tokens", dtype="int64", shape=[1, "seq_len"]),
            TensorSpec(name="input_pos", dtype="int64", shape=[1]),
        ],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[1, 1024])],
        tokenizer=TokenizerInfo(files=["tokenizer.json", "tokenizer_config.json"], bos_id=0, eos_ids=[1]),
    )
    fields.update(overrides)
    return Manifest(**fields)
