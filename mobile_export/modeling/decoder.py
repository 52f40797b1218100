"""Export-ready decoder: a transformers causal LM with a static KV cache.

The wrapper keeps the model's own decoder layers (norms, MLP, residual wiring come from
transformers, so they match the original exactly) and swaps each layer's attention for one
built by its attention kind (:mod:`mobile_export.modeling.attention_kinds`); what differs
between model families comes from their records (:mod:`mobile_export.families`).

One method serves prefill and decode: ``forward(tokens[1, T], input_pos[1]) -> logits``,
with a dynamic ``T``, the calling convention of ExecuTorch's LLM runner.
"""

from __future__ import annotations

import torch
from torch import nn

from mobile_export.families import family_of, model_types
from mobile_export.modeling.attention import AttentionSpec, StepContext
from mobile_export.modeling.attention_kinds import attention_kind
from mobile_export.modeling.norms import replace_norms
from mobile_export.modeling.projections import GatedMLP, split_gate_up
from mobile_export.modeling.rope import rotate_half_matrix
from mobile_export.rope_tables import rope_tables, rotary_dim_of

# Decoder families whose transformers modules this wrapper is tested against: the registered
# ones (adding one gives it the parity tests in tests/test_modeling.py).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = model_types()


def check_supported(config) -> None:
    """Refuse architectures this wrapper has not been verified on, naming what is supported."""
    family_of(config)


class ExportableDecoder(nn.Module):
    """A transformers causal LM rewired for export: static KV cache, last-token logits.

    ``forward(tokens: int64[1, T], input_pos: int64[1]) -> float32[1, vocab]`` writes the T
    tokens' keys/values at ``input_pos[0]`` and returns the logits of the last token.
    """

    def __init__(self, hf_model: nn.Module, max_seq_len: int, attention: str = "executorch"):
        super().__init__()
        config = hf_model.config
        family = family_of(config)
        kind_class = attention_kind(attention)
        kind_class.load_ops()
        self.attention = attention
        self.family = family
        self.config = config
        self.max_seq_len = max_seq_len
        base = hf_model.model
        self.embed_tokens = base.embed_tokens
        # padding_idx only affects training gradients; without it the quantized-embedding
        # pattern ExecuTorch fuses into its embedding kernels matches.
        self.embed_tokens.padding_idx = None
        self.layers = base.layers
        self.norm = base.norm
        self.lm_head = hf_model.lm_head
        self.final_softcap = family.final_softcap_of(config)
        self.ctx = StepContext()
        head_dim = int(self.layers[0].self_attn.head_dim)
        rotary_cls = type(base.rotary_emb)
        tables = rope_tables(rotary_cls, config, max_seq_len, head_dim, by_layer_type=family.rope_by_layer_type)
        rotary_dim = max({rotary_dim_of(sin[1:]) for _, sin in tables.values()})
        self.kind = kind_class(rotary_dim, head_dim)
        self.register_buffer("rope_rot", rotate_half_matrix(head_dim, rotary_dim), persistent=False)
        self._rope_keys: list[str] = []
        self._rope_scaling: dict[str, float] = {}  # keys whose rows the graph computes (no table)
        frequencies = self.kind.rope_frequencies(rotary_cls, config, tables)
        key_for_type: dict[str | None, str] = {}
        for index, (layer_type, (cos, sin)) in enumerate(tables.items()):
            key = f"rope{index}"
            if layer_type in frequencies:
                inv_freq, self._rope_scaling[key] = frequencies[layer_type]
                self.register_buffer(f"{key}_inv_freq", inv_freq, persistent=False)
            else:
                self.register_buffer(f"{key}_cos", cos, persistent=False)
                self.register_buffer(f"{key}_sin", sin, persistent=False)
            for suffix, buffer in self.kind.extra_rope_buffers(cos, sin).items():
                self.register_buffer(f"{key}_{suffix}", buffer, persistent=False)
            key_for_type[layer_type] = key
        for i, layer in enumerate(self.layers):
            self._rope_keys.append(key_for_type[family.rope_layer_type(config, i)])
            spec = AttentionSpec.of_layer(family, config, layer.self_attn, i, max_seq_len, rotary_dim)
            dtype = next(layer.parameters()).dtype
            layer.self_attn = self.kind.make_layer(layer.self_attn, spec, max_seq_len, self.ctx, i, dtype)
            if family.fused_gate_up and not isinstance(layer.mlp, GatedMLP):  # (a rewrap reuses the split)
                layer.mlp = split_gate_up(layer.mlp)

    def prepare_for_export(self) -> None:
        """Swap RMSNorms for XNNPACK-friendly equivalents (after weights are in place).

        ONNX keeps transformers' own RMSNorms: that is the pattern ONNX Runtime's
        ``SimplifiedLayerNormalization`` fusions recognise.
        """
        if self.kind.replaces_norms:
            replace_norms(self, self.family.norm_offset)

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Eager call in the runner's convention: feed ``tokens`` at ``start_pos``, get logits [vocab] (fp32)."""
        from mobile_export.runtimes.executorch import native_output_silenced

        # ExecuTorch's eager custom ops log CPU probing and "No temp allocator provided" natively.
        with torch.no_grad(), native_output_silenced():
            ids = torch.tensor([tokens], dtype=torch.long)
            return self.run(ids, start_pos, start_pos + len(tokens))[0].float()

    def reset_cache(self) -> None:
        """Zero every layer's KV cache (eager use between independent sequences)."""
        if not self.kind.has_inner_cache:
            return  # no cache inside the model
        for layer in self.layers:
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()

    def run_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Eager call of decoder layer ``index`` alone on hidden states [1, T, D] at positions
        0..T-1 (layer-by-layer calibration); writes that layer's KV cache."""
        seq = hidden.shape[1]
        self.ctx.start_pos, self.ctx.end_pos, self.ctx.mask = 0, seq, None
        cos, sin = self._rope_rows(self._rope_keys[index], 0, seq)
        with torch.no_grad():
            out = self.layers[index](
                hidden, position_embeddings=(cos, sin, self.rope_rot), attention_mask=None, position_ids=None
            )
        return out[0] if isinstance(out, tuple) else out

    def _rope_rows(self, key: str, start_pos, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows [seq, 1, head_dim] of positions ``start_pos ..``: computed from the
        frequencies when the table was dropped, else sliced from the table."""
        if key not in self._rope_scaling:
            cos, sin = getattr(self, f"{key}_cos"), getattr(self, f"{key}_sin")
            return cos.narrow(0, start_pos, seq), sin.narrow(0, start_pos, seq)
        # arange from start_pos rather than arange + start_pos: a symbolic start stays a scalar
        # argument, so ExecuTorch's SymToTensorPass finds nothing to rewrite and is skipped
        positions = torch.arange(start_pos, start_pos + seq, dtype=torch.float32)
        freqs = positions[:, None] * getattr(self, f"{key}_inv_freq")[None, :]
        freqs = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        scaling = self._rope_scaling[key]
        return freqs.cos() * scaling, freqs.sin() * scaling

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        start_pos = input_pos[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos < self.max_seq_len)
        torch._check(start_pos + seq <= self.max_seq_len)
        return self.run(tokens, start_pos, start_pos + seq)

    def run(
        self, tokens: torch.Tensor, start_pos, end_pos, mask: torch.Tensor | None = None, all_positions: bool = False
    ) -> torch.Tensor:
        """Feed ``tokens`` at positions ``start_pos .. end_pos - 1``; return the last token's logits
        ([1, vocab]), or every token's ([1, T, vocab]) with ``all_positions``.

        ``mask`` (portable attention only) is an additive [1, 1, T, end_pos] mask; None means causal.
        """
        seq = tokens.shape[1]
        self.ctx.start_pos = start_pos
        self.ctx.end_pos = end_pos
        self.ctx.mask = mask
        hidden = self.embed_tokens(tokens)
        rope = {key: self.kind.rope_inputs(self, key, start_pos, end_pos, seq) for key in sorted(set(self._rope_keys))}
        for layer, key in zip(self.layers, self._rope_keys, strict=True):
            out = layer(hidden, position_embeddings=rope[key], attention_mask=None, position_ids=None)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = self.norm(hidden if all_positions else hidden[:, -1, :])
        logits = self.lm_head(hidden)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        self.ctx.mask = None
        return logits
