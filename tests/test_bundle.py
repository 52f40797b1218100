"""Bundles: atomic staging, manifest file list and checksums, manifest reading, zip layout."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
from fake_bundles import make_manifest

from mobile_export.bundle import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    bundle_name,
    read_checked_manifest,
    read_manifest,
    staged_bundle,
    verify_checksums,
    write_manifest,
    write_zip,
)
from mobile_export.errors import UserError

FILES = {
    "model.pte": b"\x00PTE" + bytes(range(256)) * 4,
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"bos_token": "<s>"}',
    "extra/notes.txt": b"nested files are listed with posix paths\n",
}


def populate(folder: Path) -> Path:
    for rel, data in FILES.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A bundle folder with a correct manifest.json."""
    folder = populate(tmp_path / "demo-android")
    write_manifest(folder, make_manifest())
    return folder


def listing(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden ones included."""
    return sorted(os.listdir(folder))


# --- staged_bundle ----------------------------------------------------------------------------


def test_staged_bundle_renames_into_place_on_success(tmp_path):
    final = tmp_path / "dist" / "demo-android"
    with staged_bundle(final, force=False) as stage:
        assert stage.parent == final.parent
        assert stage.name.startswith(".demo-android.tmp-")
        assert not final.exists()
        (stage / "model.pte").write_bytes(b"pte")
    assert (final / "model.pte").read_bytes() == b"pte"
    assert not stage.exists()
    assert listing(final.parent) == ["demo-android"]


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_staged_bundle_leaves_nothing_when_the_block_fails(tmp_path, exc_type):
    final = tmp_path / "dist" / "demo-android"
    with pytest.raises(exc_type):
        with staged_bundle(final, force=False) as stage:
            (stage / "model.pte").write_bytes(b"half written")
            raise exc_type()
    assert not final.exists()
    assert listing(final.parent) == []


def test_staged_bundle_refuses_existing_folder_without_force(tmp_path):
    final = tmp_path / "demo-android"
    final.mkdir()
    (final / "model.pte").write_bytes(b"old")
    with pytest.raises(UserError) as info:
        with staged_bundle(final, force=False):
            pytest.fail("the block must not run")
    message = info.value.one_line()
    assert f"output folder {final} already exists" in message
    assert "--force" in message
    assert (final / "model.pte").read_bytes() == b"old"
    assert listing(tmp_path) == ["demo-android"]


def test_staged_bundle_with_force_replaces_existing_folder(tmp_path):
    final = tmp_path / "demo-android"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with staged_bundle(final, force=True) as stage:
        (stage / "model.pte").write_bytes(b"new")
    assert listing(final) == ["model.pte"]
    assert (final / "model.pte").read_bytes() == b"new"
    assert listing(tmp_path) == ["demo-android"]  # no staging or .old- folder left


def test_staged_bundle_with_force_keeps_old_folder_when_the_block_fails(tmp_path):
    final = tmp_path / "demo-android"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staged_bundle(final, force=True) as stage:
            (stage / "model.pte").write_bytes(b"new")
            raise KeyboardInterrupt
    assert listing(final) == ["old.txt"]
    assert listing(tmp_path) == ["demo-android"]


def test_bundle_name_adds_backend_only_when_not_the_default():
    assert bundle_name("demo", "android", "xnnpack", "xnnpack") == "demo-android"
    assert bundle_name("demo", "ios", "xnnpack", "coreml") == "demo-ios-xnnpack"


# --- write_manifest / verify_checksums --------------------------------------------------------


def test_write_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    folder = populate(tmp_path / "b")
    returned = write_manifest(folder, make_manifest())
    on_disk = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    expected = [
        {"path": rel, "bytes": len(FILES[rel]), "sha256": hashlib.sha256(FILES[rel]).hexdigest()}
        for rel in sorted(FILES)
    ]
    assert on_disk["files"] == expected
    assert [f.model_dump() for f in returned.files] == expected
    assert on_disk["schema_version"] == MANIFEST_SCHEMA_VERSION
    assert on_disk["model"]["name"] == "demo"


def test_write_manifest_twice_does_not_list_the_manifest_itself(bundle):
    write_manifest(bundle, make_manifest())
    paths = [entry["path"] for entry in json.loads((bundle / MANIFEST_NAME).read_text())["files"]]
    assert paths == sorted(FILES)


def test_read_manifest_round_trips(bundle):
    manifest = read_manifest(bundle)
    expected = make_manifest()
    expected.files = manifest.files
    assert manifest == expected
    assert verify_checksums(bundle, manifest) == []


def test_verify_checksums_reports_modified_content(bundle):
    path = bundle / "model.pte"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    assert verify_checksums(bundle, read_manifest(bundle)) == ["model.pte: sha256 mismatch"]


def test_verify_checksums_reports_size_change(bundle):
    (bundle / "tokenizer.json").write_bytes(FILES["tokenizer.json"] + b" ")
    size = len(FILES["tokenizer.json"])
    assert verify_checksums(bundle, read_manifest(bundle)) == [f"tokenizer.json: size {size + 1} != {size} in manifest"]


def test_verify_checksums_reports_missing_files(bundle):
    (bundle / "extra" / "notes.txt").unlink()
    (bundle / "tokenizer_config.json").unlink()
    assert verify_checksums(bundle, read_manifest(bundle)) == [
        "extra/notes.txt: missing",
        "tokenizer_config.json: missing",
    ]


def test_read_checked_manifest_refuses_a_damaged_bundle(bundle):
    (bundle / "model.pte").write_bytes(b"x")
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(UserError) as info:
        read_checked_manifest(bundle)
    message = info.value.one_line()
    assert f"bundle {bundle} failed its checksum check: model.pte: size 1" in message
    assert "(and 1 more)" in message


# --- read_manifest errors ---------------------------------------------------------------------


def read_error(folder: Path) -> str:
    with pytest.raises(UserError) as info:
        read_manifest(folder)
    return info.value.one_line()


def test_read_manifest_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    assert f"bundle {missing} does not exist" in read_error(missing)


def test_read_manifest_folder_without_manifest(tmp_path):
    populate(tmp_path)
    assert f"{tmp_path} has no manifest.json" in read_error(tmp_path)


def test_read_manifest_invalid_json(bundle):
    (bundle / MANIFEST_NAME).write_text('{"schema_version": 1,', encoding="utf-8")
    message = read_error(bundle)
    assert f"{bundle / MANIFEST_NAME} is not valid JSON" in message


def test_read_manifest_newer_schema_says_upgrade(bundle):
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    data["schema_version"] = MANIFEST_SCHEMA_VERSION + 1
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    message = read_error(bundle)
    assert f"manifest schema {MANIFEST_SCHEMA_VERSION + 1}" in message
    assert f"reads up to {MANIFEST_SCHEMA_VERSION}" in message
    assert "upgrade mobile-export" in message


@pytest.mark.parametrize("value", [None, "1"])
def test_read_manifest_schema_version_missing_or_not_an_integer(bundle, value):
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    if value is None:
        del data["schema_version"]
    else:
        data["schema_version"] = value
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    assert "key 'schema_version' missing or not an integer" in read_error(bundle)


def test_read_manifest_names_a_missing_required_key(bundle):
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    del data["tokenizer"]
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    message = read_error(bundle)
    assert "key 'tokenizer'" in message
    assert "rebuild the bundle" in message


# --- write_zip --------------------------------------------------------------------------------


def test_write_zip_holds_the_bundle_under_a_top_level_folder(bundle, tmp_path):
    zip_path = tmp_path / "demo-android.zip"
    assert write_zip(bundle, zip_path) == zip_path
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(f"demo-android/{rel}" for rel in [*FILES, MANIFEST_NAME])
        for rel, data in FILES.items():
            assert archive.read(f"demo-android/{rel}") == data
        assert archive.read(f"demo-android/{MANIFEST_NAME}") == (bundle / MANIFEST_NAME).read_bytes()
        assert archive.testzip() is None
    assert listing(tmp_path) == ["demo-android", "demo-android.zip"]  # no temporary file left
