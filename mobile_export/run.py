"""``mobile-export run``: load a bundle on the host, generate greedily, stream text, report speed."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from mobile_export.bundle import load_tokenizer, open_bundle
from mobile_export.errors import UserError
from mobile_export.generate import GenerationStats, TextStreamer, generate
from mobile_export.targets import get_backend


def load_bundle_tokenizer(bundle: Path):
    """The tokenizer saved in a bundle (only its listed files; never its code: see bundle.load_tokenizer)."""
    return load_tokenizer(bundle)


def run_bundle(bundle: Path, prompt: str, max_new_tokens: int, out: TextIO) -> GenerationStats:
    """Generate from ``prompt`` with the bundle's artifact, writing text to ``out`` as it comes."""
    manifest = open_bundle(bundle)
    backend = get_backend(manifest.backend)
    runtime = backend.open(bundle / manifest.artifact["file"])
    tokenizer = load_bundle_tokenizer(bundle)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        raise UserError("the prompt encodes to no tokens", hint="pass a non-empty --prompt")
    if len(prompt_ids) >= manifest.context_length:
        raise UserError(
            f"prompt has {len(prompt_ids)} tokens; the bundle's context is {manifest.context_length}",
            hint="use a shorter prompt",
        )
    streamer = TextStreamer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    out.write(prompt)
    out.flush()

    def on_token(token: int) -> None:
        out.write(streamer.push(token))
        out.flush()

    stats = generate(
        runtime.step,
        prompt_ids,
        max_new_tokens,
        set(manifest.tokenizer.eos_ids),
        manifest.context_length,
        on_token=on_token,
    )
    out.write("\n")
    from mobile_export.report import print_run_stats

    print_run_stats(stats, runtime.load_seconds)
    return stats
