"""Checks shared by the CLI error tests: run a command in-process, and require one `error:` line."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from mobile_export.cli import main

# A tiny Llama config.json (sizes only; tests add weights or break it)
LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def invoke(*args: str | Path, **kwargs) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def error_line(result: Result, code: int = 2) -> str:
    """The command failed with exactly one `error:` line, the last on stderr, and no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], result.stderr
    return errors[0]
