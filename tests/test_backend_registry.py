"""A backend is one module: the registry finds it, and the command line, recipes and the
quantization checks take it in with no other edit. What the registry derives today is pinned."""

from __future__ import annotations

import sys
import textwrap

import pytest
from click.testing import CliRunner

import mobile_export.backends as backends
from mobile_export.cli import main
from mobile_export.errors import UserError
from mobile_export.quant_algos.support import check_algorithm_support
from mobile_export.quantize import QuantSpec

THROWAWAY = textwrap.dedent(
    """
    from mobile_export.backends import Backend, register


    @register
    class ThrowawayBackend(Backend):
        name = "throwaway"
        targets = ("android",)
        schemes = ("fp32", "int8")
        order = 50
        target_rank = {"android": 5}
        quant_algos = ("rtn", "gptq")
        rotates = True

        def export(self, model, info, out_dir, ui):
            return {}

        def verify(self, ctx, artifact, decoder):
            raise NotImplementedError

        def open(self, artifact):
            raise NotImplementedError
    """
)


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    """A backend module in a folder of its own, found by the registry's discovery."""
    (tmp_path / "throwaway_backend.py").write_text(THROWAWAY)
    monkeypatch.setattr(backends, "__path__", [*backends.__path__, str(tmp_path)])
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_loaded", False)
    yield
    sys.modules.pop("mobile_export.backends.throwaway_backend", None)


def test_registry_finds_the_four_backends_in_their_listing_order():
    assert [cls.name for cls in backends.backend_classes()] == ["xnnpack", "coreml", "coreml-executorch", "onnx"]
    assert backends.target_backends("android") == ("xnnpack", "onnx")
    assert backends.target_backends("ios") == ("coreml", "coreml-executorch", "xnnpack", "onnx")


def test_build_help_lists_backends_and_schemes_as_before():
    out = CliRunner().invoke(main, ["build", "--help"], terminal_width=1000).output
    assert "Backend (default from the recipe): xnnpack, coreml, coreml-executorch or onnx." in out
    assert (
        "Weight quantization (default from the recipe): xnnpack fp32|8da4w|int8; "
        "coreml fp16|int4|int8|palettize4|palettize6; coreml-executorch fp32|int4|int8; onnx fp32|fp16|int4|int8."
    ) in out


def test_one_module_adds_a_backend_everywhere(throwaway):
    assert "throwaway" in backends.available()
    assert backends.target_backends("android") == ("xnnpack", "onnx", "throwaway")
    assert "throwaway" not in backends.target_backends("ios")

    out = CliRunner().invoke(main, ["build", "--help"], terminal_width=1000).output
    assert "coreml-executorch, onnx or throwaway." in out
    assert "onnx fp32|fp16|int4|int8; throwaway fp32|int8." in out

    backend = backends.get_backend("throwaway")
    backend.check("android", "int8")
    with pytest.raises(UserError, match="backend 'throwaway' cannot do quantization 'int4'"):
        backend.check("android", "int4")
    with pytest.raises(UserError, match="backend 'throwaway' cannot build for target 'ios'"):
        backend.check("ios", "int8")

    check_algorithm_support(backend, QuantSpec(scheme="int8", algo="gptq", rotate=True), None)
    with pytest.raises(UserError, match="--quant-algo hqq is not available for backend throwaway") as err:
        check_algorithm_support(backend, QuantSpec(scheme="int8", algo="hqq"), None)
    assert err.value.hint == "available: rtn, gptq"

    from mobile_export.recipes import QuantSettings, Recipe, TargetSettings

    settings = {"android": TargetSettings(backend="throwaway", quant=QuantSettings(scheme="int8"))}
    assert Recipe._known_targets(settings) == settings  # a recipe may name it for android
    with pytest.raises(ValueError, match="backend 'throwaway' is not valid for ios; expected one of coreml, "):
        Recipe._known_targets({"ios": TargetSettings(backend="throwaway", quant=QuantSettings(scheme="int8"))})


def test_an_unregistered_backend_is_still_refused_with_the_known_list(throwaway):
    with pytest.raises(UserError, match="unknown or unavailable backend 'throwawy'") as err:
        backends.get_backend("throwawy")
    assert err.value.hint == (
        "available: coreml, coreml-executorch, onnx, throwaway, xnnpack; did you mean 'throwaway'?"
    )


@pytest.mark.parametrize(
    ("name", "spec", "message", "hint"),
    [
        (
            "onnx",
            QuantSpec(scheme="int4", algo="gptq"),
            "--quant-algo gptq is not available for backend onnx",
            "ONNX Runtime's quantizer offers rtn and hqq here; use --quant-algo rtn or hqq",
        ),
        (
            "onnx",
            QuantSpec(scheme="int4", rotate=True),
            "--rotate is not available for backend onnx",
            "leave out --rotate",
        ),
        (
            "xnnpack",
            QuantSpec(scheme="8da4w", group_sizes=(("lm_head", 64),)),
            "--group-size-for is not available for backend xnnpack",
            "available for: onnx; use --group-size for every layer",
        ),
        (
            "coreml",
            QuantSpec(scheme="int4", embedding_group_size=64, embedding="int4"),
            "--embedding-group-size is not available for backend coreml",
            "its embedding table is quantized by the converter with --group-size",
        ),
        (
            "coreml",
            QuantSpec(scheme="palettize4", algo="hqq"),
            "--quant-algo hqq is not available for coreml palettize4",
            "use --quant int4 or int8 with it, or --quant-algo rtn",
        ),
    ],
)
def test_combination_errors_are_unchanged(name, spec, message, hint):
    with pytest.raises(UserError) as err:
        check_algorithm_support(backends.get_backend(name), spec, None)
    assert err.value.message == message
    assert err.value.hint == hint
