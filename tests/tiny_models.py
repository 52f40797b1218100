"""Tiny transformers configs of every supported architecture, with the features each family has.

Vocabulary 1024 matches the project's demo tokenizer, so folders built from these configs can be
bundled with it and run end to end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

from mobile_export.families import get_family
from mobile_export.sources import DEMO_TOKENIZER_DIR

VOCAB = 1024
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256
)


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    """A small config of ``arch`` exercising that family's features (GQA, biases, rope variants...):
    its family record's tiny config (:mod:`mobile_export.families`) over the shared sizes."""
    family = get_family(arch)
    cfg = transformers.AutoConfig.for_model(arch, **{**_COMMON, **family.tiny_config_arguments()})
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.bos_token_id, cfg.eos_token_id = 0, 1
    return cfg


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """Random weights of a tiny ``arch`` model (larger init so logits are not flat)."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cfg.initializer_range = 0.2
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return model


TEXT = Path(__file__).resolve().parent.parent / "mobile_export" / "assets" / "text" / "fixed_eval.txt"


def train_briefly(model: torch.nn.Module, steps: int = 150, seq: int = 64, batch: int = 8, seed: int = 0) -> float:
    """Train on the project's own text for a few seconds so weights have structure.

    Quantization error on random weights says nothing (random networks amplify any noise);
    a briefly trained model behaves like a real one: peaked logits that 4-bit weights keep.
    Returns the last training loss (ln 1024 = 6.9 at the start).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO_TOKENIZER_DIR / "tokenizer.json"))
    ids = torch.tensor(tok.encode(TEXT.read_text(encoding="utf-8")).ids)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    threads = torch.get_num_threads()
    # One thread: these matrices are too small to split, and a second OpenMP thread that has to
    # wait for a busy core makes each step ~10x slower (measured 0.04 s vs 0.5 s per step).
    torch.set_num_threads(1)
    try:
        loss = _train_steps(model, opt, ids, steps, seq, batch, gen)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return float(loss)


def _train_steps(model, opt, ids, steps: int, seq: int, batch: int, gen) -> torch.Tensor:
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.detach()


def write_model_dir(folder: Path, arch: str, seed: int = 0, trained: bool = True) -> Path:
    """A Hugging Face folder: config, safetensors weights (briefly trained) and the demo tokenizer."""
    if trained:
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
        train_briefly(model, seed=seed)
    else:
        model = tiny_model(arch, seed)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_TOKENIZER_DIR / name, folder / name)
    return folder
