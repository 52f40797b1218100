"""Bad inputs that used to end in a traceback (or gigabytes allocated): each gets one `error:`
line, a non-zero exit, and nothing written; checked before any heavy work. Also: malformed rows
of results files are named as such, and native runtime logs stay quiet unless asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from cli_checks import LLAMA, error_line, invoke
from doubles.lab import bench_record, fake_bundle
from safetensors.torch import save_file

from mobile_export.bundle import check_destination
from mobile_export.devicelab.results import read_results
from mobile_export.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# --- recipes, model folders, destinations, memory --------------------------------------------------------


def recipe_file(tmp_path: Path, **config) -> Path:
    data = yaml.safe_load((RECIPES_DIR / "demo.yaml").read_text())
    data["config"].update(config)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    line = error_line(invoke("recipes", "show", path))
    assert line == f"error: {path} is not UTF-8 text (byte 9) (save the recipe as UTF-8)"


def test_plan_that_is_not_utf8(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_bytes(b"name: \xff\n")
    line = error_line(invoke("bench", path, "--out", tmp_path / "out"))
    assert "is not UTF-8 text" in line


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"vocab_size": 0}, "vocab_size must be a positive integer, not 0"),
        ({"num_hidden_layers": -2}, "num_hidden_layers must be a positive integer, not -2"),
        ({"hidden_size": -256}, "hidden_size must be a positive integer, not -256"),
        ({"intermediate_size": "big"}, "intermediate_size must be a positive integer, not 'big'"),
        ({"num_attention_heads": 5}, "num_attention_heads 5 is not divisible by num_key_value_heads 2"),
        ({"head_dim": None, "num_attention_heads": 6, "num_key_value_heads": 3}, "hidden_size 256 is not divisible"),
    ],
)
@pytest.mark.parametrize("command", ["show", "build"])
def test_recipe_with_impossible_sizes(tmp_path, config, message, command):
    path = recipe_file(tmp_path, **config)
    args = ["recipes", "show", path] if command == "show" else ["build", path, "-t", "android", "-o", tmp_path / "o"]
    line = error_line(invoke(*args))
    assert f"{path}: key 'config': {message}" in line
    assert not (tmp_path / "o").exists()


def folder_with_config(folder: Path, config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("recipe", [None, "smollm2-135m"])
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([1, 2], "expected a JSON object of config keys"),
        ({**LLAMA, "vocab_size": 0}, "vocab_size must be a positive integer, not 0"),
        ({**LLAMA, "num_hidden_layers": -1}, "num_hidden_layers must be a positive integer, not -1"),
        ({**LLAMA, "num_attention_heads": 3}, "hidden_size 32 is not divisible by num_attention_heads 3"),
    ],
)
def test_folder_config_that_cannot_be_a_decoder(tmp_path, recipe, config, message):
    folder = folder_with_config(tmp_path / "model", config)
    args = ["build", *([recipe] if recipe else []), "-t", "android", "--model-path", folder, "-o", tmp_path / "o"]
    line = error_line(invoke(*args))
    assert f"{folder / 'config.json'}: {message}" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("recipe", [[], ["demo"]])
def test_model_path_that_is_a_file(tmp_path, recipe):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x")
    line = error_line(invoke("build", *recipe, "-t", "android", "--model-path", path, "-o", tmp_path / "o"))
    assert f"model path {path} is not a folder" in line


def test_output_on_an_existing_file_is_refused_before_loading(tmp_path):
    target = tmp_path / "dist"
    target.write_text("a file")
    result = invoke("build", "demo", "-t", "android", "-o", target)
    line = error_line(result)
    assert f"output folder {target}: {target} is a file" in line
    assert "Load demo" not in result.output
    assert target.read_text() == "a file"


def test_output_in_a_place_that_cannot_be_written(tmp_path):
    line = error_line(invoke("build", "demo", "-t", "android", "-o", "/proc/mobile-export-test"))
    assert "cannot write in /proc" in line


def test_check_destination_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK) and os.geteuid() == 0:
            # root writes anyway; the real probe then succeeds, and so would the build
            check_destination(folder / "demo-android", force=False)
        else:
            with pytest.raises(UserError, match="cannot write in"):
                check_destination(folder / "demo-android", force=False)
    finally:
        folder.chmod(0o700)


def test_huge_context_length_is_refused_with_the_memory_figure(tmp_path):
    path = recipe_file(tmp_path, max_position_embeddings=10**9)
    result = invoke("build", path, "-t", "android", "--context-length", str(10**9), "-o", tmp_path / "o")
    line = error_line(result)
    # demo: 2 layers x 2 kv heads x 32 dims x 2 (K, V) x 4 bytes = 1 KiB per token; two caches
    assert "this build needs about 1.91e+03 GB of memory, of which KV caches 1.91e+03 GB" in line
    assert "Load demo" not in result.output


def test_weights_that_do_not_match_the_config_name_the_tensor(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    transformers.LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}).to_json_file(
        str(folder / "config.json")
    )
    save_file({"model.embed_tokens.weight": torch.zeros(64, 48)}, str(folder / "model.safetensors"))
    shutil.copyfile(fake_bundle(tmp_path / "b") / "tokenizer.json", folder / "tokenizer.json")
    line = error_line(invoke("build", "-t", "android", "--model-path", folder, "-o", tmp_path / "o"))
    assert (
        "model.safetensors: tensor model.embed_tokens.weight has shape [64, 48], but config.json implies [64, 32]"
        in (line)
    )
    assert "look at the above report" not in line


def test_user_errors_fold_library_line_breaks():
    assert UserError("first\n\tsecond  line", hint="do\nthis").one_line() == "first second line (do this)"


# --- results lines with malformed metrics ---------------------------------------------------


def test_non_numeric_metric_marks_the_row_malformed(tmp_path):

    good, bad = bench_record(1, 10.0), bench_record(2, 11.0)
    bad["metrics"]["decode_tokens_per_s"] = "fast"
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    loaded = read_results(path)
    assert [r["repetition"] for r in loaded.records] == [1]
    assert loaded.skipped_lines == [
        f"{path} line 2: malformed row: key 'metrics': metric 'decode_tokens_per_s' is 'fast', not a number; skipped"
    ]
    result = invoke("report", tmp_path, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert "line 2: malformed row: key 'metrics': metric 'decode_tokens_per_s'" in result.stderr


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("scenario", {"name": "s", "fingerprint": "f"}, "key 'scenario.prompt_tokens': Field required"),
        ("created_at", 5, "key 'created_at'"),
        ("versions", ["a"], "key 'versions'"),
        ("plan", {"name": 3}, "key 'plan.name'"),
    ],
)
def test_rows_a_report_cannot_read_are_malformed(tmp_path, field, value, message):

    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(bench_record(1, 10.0)) + "\n" + json.dumps(bench_record(2, 10.0, **{field: value})))
    loaded = read_results(path)
    assert len(loaded.records) == 1
    assert loaded.skipped_lines[0].startswith(f"{path} line 2: malformed row: {message}")


# --- native logs ----------------------------------------------------------------------------


def test_native_logs_are_silenced_unless_verbose():
    """What native code writes to fd 2 is dropped inside ``native_output_silenced`` and kept
    after ``show_native_logs`` (``build --verbose``), in a fresh process whose stderr is seen."""
    code = (
        "import os\n"
        "from mobile_export.runtimes.executorch import native_output_silenced, show_native_logs\n"
        "with native_output_silenced():\n    os.write(2, b'quiet ')\n"
        "show_native_logs()\n"
        "with native_output_silenced():\n    os.write(2, b'verbose')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "verbose"
