"""The shipped trained fixtures are the ones their expectations were written against."""

from __future__ import annotations

import json

from trained_model import FIXTURES, actual_sums, expected_sums, trained_model_dir

from mobile_export.modeling import SUPPORTED_MODEL_TYPES


def test_fixture_files_match_their_recorded_sha256():
    expected, actual = expected_sums(), actual_sums()
    assert set(actual) == set(expected), "files added or removed: rerun tools/make_test_fixtures.py"
    drifted = sorted(path for path, digest in actual.items() if expected[path] != digest)
    assert not drifted, f"fixture files changed (retrain with tools/make_test_fixtures.py): {drifted}"


def test_every_architecture_has_a_trained_folder_and_the_trained_model_learned():
    for arch in SUPPORTED_MODEL_TYPES:
        config = json.loads((FIXTURES / f"tiny-{arch}" / "config.json").read_text())
        assert config["model_type"] == arch and (FIXTURES / f"tiny-{arch}" / "model.safetensors").is_file()
    facts = json.loads((trained_model_dir() / "training.json").read_text())
    # held-out perplexity far below the random initialisation's: the weights carry structure
    assert facts["heldout_perplexity"] < facts["random_init_heldout_perplexity"] / 4
