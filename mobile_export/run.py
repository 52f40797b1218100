"""``mobile-export run``: load a bundle on the host, continue a prompt or chat (greedy or sampled),
stream text, report speed."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from mobile_export.bundle import load_tokenizer, read_checked_manifest
from mobile_export.errors import UserError
from mobile_export.generate import GenerationStats, Sampling, TextStreamer, generate
from mobile_export.runtimes import Runtime, open_bundle


def load_bundle_tokenizer(bundle: Path):
    """The tokenizer saved in a bundle (only its listed files; never its code: see bundle.load_tokenizer)."""
    return load_tokenizer(bundle)


def _open_runtime(bundle: Path, manifest) -> Runtime:
    return open_bundle(bundle, manifest)


def _check_length(ids: list[int], manifest, what: str) -> None:
    if not ids:
        raise UserError(f"the {what} encodes to no tokens", hint="pass a non-empty --prompt")
    if len(ids) >= manifest.context_length:
        raise UserError(
            f"{what} has {len(ids)} tokens; the bundle's context is {manifest.context_length}",
            hint="use a shorter prompt" if what == "prompt" else "start a new chat",
        )


def _stream(tokenizer, out: TextIO):
    streamer = TextStreamer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))

    def on_token(token: int) -> None:
        out.write(streamer.push(token))
        out.flush()

    return on_token


def run_bundle(
    bundle: Path, prompt: str, max_new_tokens: int, out: TextIO, sampling: Sampling | None = None
) -> GenerationStats:
    """Continue ``prompt`` with the bundle's artifact, writing text to ``out`` as it comes."""
    manifest = read_checked_manifest(bundle)
    runtime = _open_runtime(bundle, manifest)
    tokenizer = load_bundle_tokenizer(bundle)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    _check_length(prompt_ids, manifest, "prompt")
    out.write(prompt)
    out.flush()
    stats = generate(
        runtime.step,
        prompt_ids,
        max_new_tokens,
        set(manifest.tokenizer.eos_ids) | set(manifest.tokenizer.end_of_turn_ids),
        manifest.context_length,
        on_token=_stream(tokenizer, out),
        pick=(sampling or Sampling()).picker(),
    )
    out.write("\n")
    from mobile_export.report import print_run_stats

    print_run_stats(stats, runtime.load_seconds)
    return stats


def run_chat(
    bundle: Path, turns: Iterable[str], max_new_tokens: int, out: TextIO, sampling: Sampling | None = None
) -> list[GenerationStats]:
    """Chat with the bundle: each user message is added to the conversation, the bundle's chat
    template renders it, and the reply (streamed to ``out``) ends on any end-of-turn id."""
    from mobile_export.chat import Conversation, chat_template, stop_ids

    manifest = read_checked_manifest(bundle)
    tokenizer = load_bundle_tokenizer(bundle)
    if chat_template(tokenizer) is None:
        raise UserError(
            f"bundle {bundle} has no chat template (its tokenizer has none)",
            hint="run it without --chat to continue a prompt, or build from a chat model",
        )
    runtime = _open_runtime(bundle, manifest)
    stops = set(stop_ids(tokenizer, manifest.tokenizer.eos_ids, manifest.tokenizer.end_of_turn_ids))
    pick = (sampling or Sampling()).picker()  # one random stream for the whole conversation
    conversation = Conversation(tokenizer)
    all_stats = []
    for text in turns:
        ids = conversation.prompt_for(text)
        _check_length(ids, manifest, "conversation")
        # The whole conversation is prefilled each turn (from position 0), so every runtime
        # starts from the same state as for a single prompt.
        stats = generate(
            runtime.step,
            ids,
            max_new_tokens,
            stops,
            manifest.context_length,
            on_token=_stream(tokenizer, out),
            pick=pick,
        )
        out.write("\n")
        out.flush()
        reply = [t for t in stats.tokens if t not in stops]
        conversation.add_reply(tokenizer.decode(reply, skip_special_tokens=True).strip())
        all_stats.append(stats)
    if len(all_stats) == 1:
        from mobile_export.report import print_run_stats

        print_run_stats(all_stats[0], runtime.load_seconds)
    return all_stats
