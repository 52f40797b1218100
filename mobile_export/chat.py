"""Chat: the chat template a bundle carries, the tokens that end a turn, and ``run --chat``.

The template is the tokenizer's own: ``chat_template.jinja`` in the bundle (what transformers and
ONNX Runtime GenAI read), also under ``chat_template`` in ``tokenizer_config.json`` for older
runners, and as text in the manifest. Prompts are built with the tokenizer's ``apply_chat_template``;
the turn's end token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>`` ...) is found by
rendering a short conversation, so every template names its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from mobile_export.errors import UserError

EXIT_COMMAND = "/exit"
_PROBE_REPLY = "mobileexportreply"  # a word no template rewrites, to find where a reply ends


def chat_template(tokenizer) -> str | None:
    """The tokenizer's chat template text (None when it has none)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids of the token the template puts right after an assistant reply, when that token is a
    special (added) token; [] for tokenizers without a template or templates that end turns
    with plain text."""
    if chat_template(tokenizer) is None:
        return []
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation shape names no end token
        return []
    at = text.rfind(_PROBE_REPLY)
    if at < 0:
        return []
    suffix = text[at + len(_PROBE_REPLY) :].lstrip(" ")
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)
    return [int(ids[0])] if ids and ids[0] in added else []


def stop_ids(tokenizer, *known: Iterable[int]) -> list[int]:
    """Every id that ends generation: the given ones (EOS ids) and the template's end of turn."""
    ids: list[int] = []
    for group in (*known, end_of_turn_ids(tokenizer)):
        for value in group:
            if int(value) not in ids:
                ids.append(int(value))
    return ids


def write_template_to_tokenizer_config(folder: Path, tokenizer) -> None:
    """Also store the chat template under ``chat_template`` in ``tokenizer_config.json``, where
    runners older than ``chat_template.jinja`` look (transformers 5 and ONNX Runtime GenAI 0.18
    read the ``.jinja`` file that ``save_pretrained`` writes)."""
    template = chat_template(tokenizer)
    path = folder / "tokenizer_config.json"
    if template is None or not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation rendered by the tokenizer's own template, ready for the assistant's turn."""
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as exc:  # jinja2 TemplateError: e.g. roles that must alternate
        raise UserError(f"the chat template refused the conversation: {exc}") from exc
    return [int(i) for i in encoded["input_ids"]]


@dataclass
class Conversation:
    """The messages so far; each turn's prompt is the whole conversation, re-rendered."""

    tokenizer: object
    messages: list[dict] = field(default_factory=list)

    def prompt_for(self, user_text: str) -> list[int]:
        """Add the user's message; return the prompt ids for the assistant's reply."""
        self.messages.append({"role": "user", "content": user_text})
        return prompt_ids(self.tokenizer, self.messages)

    def add_reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def read_turns(stream: TextIO, out: TextIO, interactive: bool) -> Iterator[str]:
    """User messages, one per line, until end of input, an empty line or ``/exit``."""
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stream.readline()
        text = line.strip()
        if not line or not text or text == EXIT_COMMAND:
            return
        yield text
