"""Recipes: the built-in ones validate, and bad recipe files fail with errors naming file, line or key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mobile_export import recipes as recipes_module
from mobile_export.backends import get_backend
from mobile_export.cli import main
from mobile_export.errors import UserError
from mobile_export.modeling import SUPPORTED_MODEL_TYPES
from mobile_export.quantize import QuantSpec
from mobile_export.recipes import Recipe, all_recipes, builtin_names, load_recipe, load_recipe_file, recipes_dir

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def recipe_data(name: str) -> dict:
    """The parsed YAML of a built-in recipe, to copy and break."""
    return yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8"))


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    """The one-line message of the UserError that loading ``path`` raises."""
    with pytest.raises(UserError) as info:
        load_recipe(str(path))
    return info.value.one_line()


# --- built-in recipes -------------------------------------------------------------------------


def test_recipes_dir_is_the_checkout_folder():
    assert recipes_dir() == RECIPES_DIR


def test_every_builtin_recipe_validates_and_is_named_after_its_file():
    stems = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    loaded = all_recipes()
    assert "demo" in stems and "smollm2-135m" in stems
    assert builtin_names() == stems
    assert [r.name for r in loaded] == stems
    assert all(isinstance(r, Recipe) for r in loaded)


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_recipe_has_buildable_android_settings(name):
    recipe = load_recipe(name)
    android = recipe.target("android")
    assert android.backend == "xnnpack"
    spec = QuantSpec(
        scheme=android.quant.scheme, group_size=android.quant.group_size, embedding=android.quant.embedding
    )
    get_backend(android.backend).check("android", spec.scheme)  # raises if the backend cannot do it
    assert recipe.architecture == recipe.config["model_type"]
    assert recipe.architecture in SUPPORTED_MODEL_TYPES
    assert recipe.eos_ids(), f"{name} has no stop token"
    if recipe.source == "hub":
        assert recipe.hf_id and len(recipe.revision) == 40


def test_builtin_recipe_loads_by_path_as_well_as_by_name(tmp_path):
    copy_path = write_recipe(tmp_path / "my-demo.yaml", recipe_data("demo"))
    assert load_recipe(str(copy_path)) == load_recipe("demo")


# --- unknown names ----------------------------------------------------------------------------


def test_misspelled_recipe_suggests_the_close_name():
    with pytest.raises(UserError) as info:
        load_recipe("smolm2-135m")
    message = info.value.one_line()
    assert "unknown recipe 'smolm2-135m'" in message
    assert "did you mean 'smollm2-135m'" in message


def test_unrelated_recipe_name_points_at_the_listing():
    with pytest.raises(UserError) as info:
        load_recipe("zzzzqqqq")
    assert "unknown recipe 'zzzzqqqq'" in info.value.one_line()
    assert "mobile-export recipes" in info.value.one_line()


def test_missing_recipe_file_path(tmp_path):
    missing = tmp_path / "nothing.yaml"
    assert f"recipe file {missing} does not exist" in load_error(missing)


# --- malformed files --------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\narchitecture: llama\nconfig: model_type: llama\n", encoding="utf-8")
    message = load_error(path)
    assert str(path) in message
    assert "line 3" in message
    assert "not valid YAML" in message


def test_top_level_list_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- demo\n- llama\n", encoding="utf-8")
    message = load_error(path)
    assert str(path) in message and "mapping" in message


def test_unknown_key_names_its_full_path(tmp_path):
    data = recipe_data("demo")
    data["targets"]["android"]["quant"]["bogus"] = 1
    path = write_recipe(tmp_path / "bogus.yaml", data)
    message = load_error(path)
    assert str(path) in message
    assert "key 'targets.android.quant.bogus'" in message
    assert "not permitted" in message


def test_wrong_type_names_the_key(tmp_path):
    data = recipe_data("demo")
    data["context_length"] = "big"
    message = load_error(write_recipe(tmp_path / "ctx.yaml", data))
    assert "key 'context_length'" in message
    assert "valid integer" in message


def test_missing_required_key_is_named(tmp_path):
    data = recipe_data("demo")
    del data["architecture"]
    message = load_error(write_recipe(tmp_path / "noarch.yaml", data))
    assert "key 'architecture'" in message
    assert "required" in message.lower()


def test_architecture_must_match_config_model_type(tmp_path):
    data = recipe_data("demo")
    data["architecture"] = "qwen2"
    message = load_error(write_recipe(tmp_path / "arch.yaml", data))
    assert "architecture 'qwen2' differs from config.model_type 'llama'" in message


def test_unknown_target_key(tmp_path):
    data = recipe_data("demo")
    data["targets"]["windows"] = copy.deepcopy(data["targets"]["android"])
    message = load_error(write_recipe(tmp_path / "win.yaml", data))
    assert "key 'targets'" in message
    assert "unknown target 'windows'" in message
    assert "android, ios" in message


def test_backend_not_valid_for_target(tmp_path):
    data = recipe_data("demo")
    data["targets"]["android"]["backend"] = "coreml"
    message = load_error(write_recipe(tmp_path / "be.yaml", data))
    assert "backend 'coreml' is not valid for android" in message
    assert "xnnpack" in message


def test_scheme_the_backend_cannot_do_is_refused_on_load(tmp_path):
    data = recipe_data("demo")
    data["targets"]["android"]["quant"]["scheme"] = "palettize4"  # a Core ML scheme
    path = write_recipe(tmp_path / "scheme.yaml", data)
    message = load_error(path)
    assert str(path) in message and "key 'targets.android.quant.scheme'" in message
    assert "backend 'xnnpack' cannot do quantization 'palettize4'" in message
    assert "fix the recipe file" in message and "fp32, 8da4w, int8" in message


def test_unknown_scheme_in_backend_quant_is_refused_on_load(tmp_path):
    data = recipe_data("demo")
    data["targets"]["android"]["backend_quant"] = {"onnx": {"scheme": "3bit"}}
    message = load_error(write_recipe(tmp_path / "bq.yaml", data))
    assert "key 'targets.android.backend_quant.onnx.scheme'" in message
    assert "unknown quantization scheme '3bit'" in message and "fp32, fp16, int4, int8" in message


@pytest.mark.parametrize("revision", ["main", "12fd25f", "12FD25F77366FA6B3B4B768EC3050BF629380BAC", None])
def test_hub_recipe_needs_a_commit_sha(tmp_path, revision):
    data = recipe_data("smollm2-135m")
    if revision is None:
        del data["revision"]
    else:
        data["revision"] = revision
    message = load_error(write_recipe(tmp_path / "rev.yaml", data))
    assert "40-character commit sha" in message


def test_context_length_beyond_model_positions(tmp_path):
    data = recipe_data("demo")
    data["context_length"] = 4096  # demo's max_position_embeddings is 2048
    message = load_error(write_recipe(tmp_path / "long.yaml", data))
    assert "context_length 4096 exceeds max_position_embeddings 2048" in message


def test_builtin_recipe_name_must_match_file_name(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes_module, "recipes_dir", lambda: tmp_path)
    path = write_recipe(tmp_path / "other.yaml", recipe_data("demo"))
    with pytest.raises(UserError) as info:
        load_recipe_file(path)
    assert "'demo' differs from the file name 'other'" in info.value.one_line()


def test_recipe_without_settings_for_a_target(tmp_path):
    data = recipe_data("demo")
    del data["targets"]["ios"]
    recipe = load_recipe(str(write_recipe(tmp_path / "android-only.yaml", data)))
    with pytest.raises(UserError) as info:
        recipe.target("ios")
    assert "has no settings for target 'ios'" in info.value.one_line()


# --- `mobile-export recipes` ------------------------------------------------------------------


def test_recipes_command_lists_every_builtin():
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 0, result.output
    for name in builtin_names():
        assert name in result.stdout
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in result.stdout


def test_recipes_show_prints_the_recipe_as_yaml():
    result = CliRunner().invoke(main, ["recipes", "show", "demo"])
    assert result.exit_code == 0, result.output
    assert "name: demo" in result.stdout
    assert Recipe.model_validate(yaml.safe_load(result.stdout)) == load_recipe("demo")


def test_recipes_show_prints_brackets_verbatim(tmp_path):
    data = recipe_data("demo")
    data["description"] = "Demo [v2] with [bold]brackets"
    path = write_recipe(tmp_path / "brackets.yaml", data)
    result = CliRunner().invoke(main, ["recipes", "show", str(path)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["description"] == "Demo [v2] with [bold]brackets"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("nope", "run 'mobile-export recipes' to list them"), ("smolm2-135m", "did you mean 'smollm2-135m'")],
)
def test_recipes_show_unknown_name(name, fragment):
    result = CliRunner().invoke(main, ["recipes", "show", name])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: unknown recipe '{name}'")
    assert fragment in lines[0]
