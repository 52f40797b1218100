"""Chat and sampling: the bundle's chat template, end-of-turn stops, multi-turn history, seeded
sampling, and ``run --chat`` on a bundle without a template.

Fast tests drive ``run --chat`` through a hand-made bundle (the demo tokenizer with a chat
template) and a scripted runtime; the slow ones build one tiny ONNX bundle from a trained tiny
Llama folder whose tokenizer has a chat template, and run it for real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from fake_bundles import make_manifest

from mobile_export.bundle import TokenizerInfo, read_manifest, write_manifest
from mobile_export.chat import end_of_turn_ids, prompt_ids, stop_ids
from mobile_export.cli import main
from mobile_export.errors import UserError
from mobile_export.generate import Sampling, generate, greedy
from mobile_export.sources import DEMO_TOKENIZER_DIR

# ChatML-like, on the demo tokenizer's three special tokens: <|bos|> opens a turn, <|pad|> ends it
# (an end-of-turn token that is not the EOS, as <|eot_id|> is for Llama 3).
TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|pad|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)
EOS, END_OF_TURN = 1, 2


def demo_tokenizer(template: str | None = TEMPLATE):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER_DIR), trust_remote_code=False)
    tokenizer.chat_template = template
    return tokenizer


def invoke(*args, input: str | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


# --- the template's end-of-turn token and the stop ids -----------------------------------------


def test_end_of_turn_is_the_token_the_template_closes_replies_with():
    assert end_of_turn_ids(demo_tokenizer()) == [END_OF_TURN]
    with_eos = TEMPLATE.replace("<|pad|>", "{{ eos_token }}")
    assert end_of_turn_ids(demo_tokenizer(with_eos)) == [EOS]
    plain_text_end = TEMPLATE.replace("<|pad|>", " END")  # not a special token: nothing to stop on
    assert end_of_turn_ids(demo_tokenizer(plain_text_end)) == []
    assert end_of_turn_ids(demo_tokenizer(None)) == []


LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "token"), [(LLAMA3, "<|eot_id|>"), (GEMMA, "<end_of_turn>"), (MISTRAL, "<|eos|>")]
)
def test_end_of_turn_of_other_template_styles(template, token):
    tokenizer = demo_tokenizer(template)
    extra = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    assert tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer)) == [token]


def test_real_smollm2_template_ends_turns_with_im_end(smollm2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir), trust_remote_code=False)
    (im_end,) = end_of_turn_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(im_end) == "<|im_end|>"


def test_stop_ids_join_eos_and_end_of_turn_without_duplicates():
    assert stop_ids(demo_tokenizer(), [EOS, EOS], [7]) == [EOS, 7, END_OF_TURN]
    assert stop_ids(demo_tokenizer(None), [EOS]) == [EOS]


def test_prompt_ids_are_apply_chat_templates():
    tokenizer = demo_tokenizer()
    messages = [{"role": "user", "content": "Hello there"}]
    ids = prompt_ids(tokenizer, messages)
    text = "<|bos|>user\nHello there<|pad|>\n<|bos|>assistant\n"
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 2  # no extra BOS


# --- sampling ------------------------------------------------------------------------------------


def _flat_step(vocab: int = 40):
    """A fake model whose logits at each position are fixed but nearly flat (scale 0.5)."""

    def step(tokens, pos):
        return torch.randn(vocab, generator=torch.Generator().manual_seed(pos + len(tokens) * 1000)) * 0.5

    return step


def _sample(sampling: Sampling, n: int = 24) -> list[int]:
    return generate(_flat_step(), [3, 4], n, eos_ids=set(), max_seq_len=100, pick=sampling.picker()).tokens


def test_seeded_sampling_is_reproducible_and_differs_from_greedy():
    greedy_tokens = _sample(Sampling())
    assert greedy_tokens == generate(_flat_step(), [3, 4], 24, set(), 100).tokens  # the default is greedy
    first = _sample(Sampling(temperature=1.0, seed=7))
    assert first == _sample(Sampling(temperature=1.0, seed=7))
    assert first != greedy_tokens  # 24 draws from near-flat distributions over 40 tokens
    assert len({tuple(_sample(Sampling(temperature=1.0, seed=s))) for s in range(4)}) > 1


def test_top_p_keeps_only_the_smallest_set_reaching_p():
    logits = torch.tensor([4.0, 3.9, 0.0, -1.0, -2.0])  # the first two hold ~97% of the mass
    pick = Sampling(temperature=1.0, top_p=0.9, seed=0).picker()
    assert {pick(logits) for _ in range(300)} == {0, 1}
    tiny_p = Sampling(temperature=1.0, top_p=1e-6, seed=0).picker()  # only the most likely token
    assert [tiny_p(logits) for _ in range(20)] == [greedy(logits)] * 20


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": -0.5}, "--temperature -0.5 is invalid"),
        ({"temperature": float("nan")}, "--temperature nan is invalid"),
        ({"temperature": 1.0, "top_p": 0.0}, "--top-p 0 is invalid"),
        ({"temperature": 1.0, "top_p": 1.5}, "--top-p 1.5 is invalid"),
        ({"seed": 3}, "--top-p and --seed apply to sampling"),
    ],
)
def test_bad_sampling_options_are_refused(fields, message):
    with pytest.raises(UserError) as info:
        Sampling(**fields)
    assert message in info.value.one_line()


# --- run --chat through a hand-made bundle and a scripted runtime --------------------------------


def _bundle(folder: Path, template: str | None) -> Path:
    """A bundle folder with the demo tokenizer (and ``template``) and any bytes as model.pte."""
    folder.mkdir()
    (folder / "model.pte").write_bytes(b"PTE" * 10)
    demo_tokenizer(template).save_pretrained(str(folder))
    files = sorted(p.name for p in folder.iterdir() if p.name != "model.pte")
    tokenizer = TokenizerInfo(
        files=files, bos_id=0, eos_ids=[EOS], chat_template=template, end_of_turn_ids=[END_OF_TURN] if template else []
    )
    write_manifest(folder, make_manifest(tokenizer=tokenizer, context_length=256))
    return folder


class ScriptedRuntime:
    """Each prefill (position 0) starts the next scripted reply; records what it was fed."""

    load_seconds = 0.0

    def __init__(self, replies: list[list[int]], vocab: int = 1024):
        self.replies, self.vocab = [list(r) for r in replies], vocab
        self.prefills: list[list[int]] = []
        self._reply: list[int] = []

    def step(self, tokens: list[int], pos: int) -> torch.Tensor:
        if pos == 0:
            self.prefills.append(list(tokens))
            self._reply = self.replies.pop(0)
        logits = torch.zeros(self.vocab)
        logits[self._reply.pop(0)] = 1.0
        return logits


@pytest.fixture
def chat_bundle(tmp_path) -> Path:
    return _bundle(tmp_path / "chat-android", TEMPLATE)


def _script(monkeypatch, replies: list[list[int]]) -> ScriptedRuntime:
    runtime = ScriptedRuntime(replies)
    monkeypatch.setattr("mobile_export.run._open_runtime", lambda bundle, manifest: runtime)
    return runtime


def test_chat_stops_on_end_of_turn_and_carries_history(chat_bundle, monkeypatch):
    tokenizer = demo_tokenizer()
    first = tokenizer("Paris is nice", add_special_tokens=False)["input_ids"]
    second = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    never = tokenizer(" NEVER", add_special_tokens=False)["input_ids"]
    runtime = _script(monkeypatch, [first + [END_OF_TURN] + never, second + [EOS] + never])

    result = invoke("run", chat_bundle, "--chat", input="Where?\nReally?\n\nignored after the empty line\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["Paris is nice", "Yes"]  # end-of-turn and EOS both stop, unprinted
    history = [
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Paris is nice"},
        {"role": "user", "content": "Really?"},
    ]
    assert runtime.prefills == [prompt_ids(tokenizer, history[:1]), prompt_ids(tokenizer, history)]
    assert runtime.prefills[1][: len(runtime.prefills[0])] == runtime.prefills[0]


def test_chat_with_one_prompt_is_one_turn(chat_bundle, monkeypatch):
    tokenizer = demo_tokenizer()
    reply = tokenizer("ok", add_special_tokens=False)["input_ids"]
    runtime = _script(monkeypatch, [reply + [END_OF_TURN]])
    result = invoke("run", chat_bundle, "--chat", "--prompt", "Hi", input="not read\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok\n"
    assert runtime.prefills == [prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])]


def test_chat_loop_ends_on_exit_command(chat_bundle, monkeypatch):
    tokenizer = demo_tokenizer()
    runtime = _script(monkeypatch, [tokenizer("a", add_special_tokens=False)["input_ids"] + [EOS]])
    result = invoke("run", chat_bundle, "--chat", input="one\n/exit\ntwo\n")
    assert result.exit_code == 0, result.output
    assert len(runtime.prefills) == 1


def test_chat_longer_than_the_context_is_one_error(chat_bundle, monkeypatch):
    runtime = _script(monkeypatch, [])
    result = invoke("run", chat_bundle, "--chat", "--prompt", "word " * 300)
    assert result.exit_code == 2 and runtime.prefills == []
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: conversation has ") and "the bundle's context is 256 (start a new chat)" in line


def test_chat_on_a_bundle_without_a_template_is_one_error(tmp_path, monkeypatch):
    bundle = _bundle(tmp_path / "plain-android", None)
    runtime = _script(monkeypatch, [])
    result = invoke("run", bundle, "--chat", "--prompt", "Hi")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: bundle {bundle} has no chat template (its tokenizer has none) "
        "(run it without --chat to continue a prompt, or build from a chat model)"
    ]
    assert result.stdout == "" and runtime.prefills == []


def test_run_without_prompt_or_chat_is_one_error(chat_bundle):
    result = invoke("run", chat_bundle)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: nothing to continue (pass --prompt TEXT, or --chat)"


def test_sampling_flags_reach_the_cli(chat_bundle):
    result = invoke("run", chat_bundle, "--prompt", "x", "--seed", "3")
    assert result.exit_code == 2
    assert "--top-p and --seed apply to sampling" in result.stderr


# --- a real tiny bundle with a chat template (one ONNX build) --------------------------------------


@pytest.fixture(scope="module")
def tiny_chat_bundle(tiny_model_dir, tmp_path_factory, build_bundle) -> Path:
    root = tmp_path_factory.mktemp("chat")
    folder = root / "tiny-chat"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE
    config_path.write_text(json.dumps(config))
    args = ["--model-path", folder, "--target", "android", "--backend", "onnx", "--quant", "fp32", "--no-eval"]
    return build_bundle(*args).bundle


@pytest.mark.slow
def test_bundle_carries_the_template_where_runners_read_it(tiny_chat_bundle):
    manifest = read_manifest(tiny_chat_bundle)
    assert manifest.tokenizer.chat_template == TEMPLATE
    assert manifest.tokenizer.end_of_turn_ids == [END_OF_TURN]
    assert set(manifest.tokenizer.eos_ids) == {EOS, END_OF_TURN}
    assert (tiny_chat_bundle / "chat_template.jinja").read_text() == TEMPLATE
    assert json.loads((tiny_chat_bundle / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert "chat_template.jinja" in manifest.tokenizer.files
    genai = json.loads((tiny_chat_bundle / "genai_config.json").read_text())
    assert sorted(genai["model"]["eos_token_id"]) == [EOS, END_OF_TURN]

    import onnxruntime_genai as og  # the app-side runtime renders the same prompt

    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    rendered = og.Tokenizer(og.Model(str(tiny_chat_bundle))).apply_chat_template(
        json.dumps(messages + [{"role": "user", "content": "more"}]), add_generation_prompt=True
    )
    assert rendered == demo_tokenizer().apply_chat_template(
        messages + [{"role": "user", "content": "more"}], add_generation_prompt=True, tokenize=False
    )


@pytest.mark.slow
def test_chat_on_the_real_runtime_feeds_the_templated_prompt(tiny_chat_bundle, monkeypatch):
    import mobile_export.run as run_module

    fed: list[tuple[list[int], int]] = []
    real_open = run_module._open_runtime

    def spying_open(bundle, manifest):
        runtime = real_open(bundle, manifest)
        step = runtime.step
        runtime.step = lambda tokens, pos: fed.append((list(tokens), pos)) or step(tokens, pos)
        return runtime

    monkeypatch.setattr(run_module, "_open_runtime", spying_open)
    result = invoke("run", tiny_chat_bundle, "--chat", "-n", "6", input="def main\nand then\n")
    assert result.exit_code == 0, result.output
    tokenizer = demo_tokenizer()
    prefills = [tokens for tokens, pos in fed if pos == 0]
    first_reply = result.stdout.splitlines()[0].strip()
    history = [{"role": "user", "content": "def main"}, {"role": "assistant", "content": first_reply}]
    assert prefills == [
        prompt_ids(tokenizer, history[:1]),
        prompt_ids(tokenizer, [*history, {"role": "user", "content": "and then"}]),
    ]


@pytest.mark.slow
def test_seeded_sampling_through_the_cli_is_reproducible(tiny_chat_bundle):
    def run(*extra):
        result = invoke("run", tiny_chat_bundle, "--prompt", "def ", "-n", "24", *extra)
        assert result.exit_code == 0, result.output
        return result.stdout

    greedy_text = run()
    assert greedy_text == run()
    sampled = [run("--temperature", "1.5", "--seed", str(seed)) for seed in range(3)]
    assert sampled[0] == run("--temperature", "1.5", "--seed", "0")
    assert any(text != greedy_text for text in sampled)
