"""Bundle integrity (`llmkd.serving.manifest`): `export` writes manifest.json (every file's size and SHA-256,
a version id); every load checks the sizes, `llmkd verify` and `llmkd serve` every hash, and any difference
is refused naming the file. Built on one export of `served_run` (conftest.py), copied per case."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
from conftest import free_port
from test_commands import run  # `llmkd ...` in a subprocess, this checkout's code

from llmkd.infra.artifacts import LlmkdError

CHANGES = {  # how a file is damaged -> (the file, what the error says differs)
    "truncate": ("item_ids.json", "size differs from manifest.json"),
    "flip": ("student/model.safetensors", "sha256 differs from manifest.json"),  # one byte, same size
    "delete": ("index/faiss.index", "missing"),
}


@pytest.fixture(scope="module")
def bundle(served_run, tmp_path_factory):
    from llmkd.serving.bundle import export_bundle

    return export_bundle(served_run[0], "student_text", tmp_path_factory.mktemp("integrity") / "b")


@pytest.fixture
def copy(bundle, tmp_path):
    shutil.copytree(bundle, tmp_path / "b")
    return tmp_path / "b"


def damage(folder, how: str) -> str:
    """Truncate, flip the last byte of, or delete the file `CHANGES[how]` names; its relative path."""
    rel = CHANGES[how][0]
    path = folder / rel
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:-5])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    return rel


def digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_of(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def test_the_manifest_lists_every_file_with_its_size_and_sha256(bundle):
    from llmkd.serving.manifest import check_files, version_of

    manifest = manifest_of(bundle)
    on_disk = {p.relative_to(bundle).as_posix(): p for p in bundle.rglob("*") if p.is_file()}
    on_disk.pop("manifest.json")
    assert set(manifest["files"]) == set(on_disk)
    assert {"config.json", "meta.json", "README.md", "student/config.json", "student/model.safetensors",
            "item_ids.json", "popularity.json", "index/faiss.index", "teacher/teacher.json"} <= set(on_disk)
    for rel, path in on_disk.items():
        assert manifest["files"][rel] == {"size": path.stat().st_size,
                                          "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}, rel
    assert manifest["format"] == "llmkd-bundle-manifest" and manifest["format_version"] == 1
    assert len(manifest["version"]) == 16 and manifest["version"] == version_of(manifest["files"])
    assert check_files(bundle, full=True) == manifest["version"]


def test_the_manifest_round_trips(copy):
    """Written again over the same files: the same bytes, the same version; a copy shares the version."""
    from llmkd.serving.manifest import read_manifest, write_manifest

    before = (copy / "manifest.json").read_bytes()
    assert write_manifest(copy) == read_manifest(copy) == json.loads(before)
    assert (copy / "manifest.json").read_bytes() == before
    assert not list(copy.glob(".*")), "the manifest's temporary file was left"


def test_the_loaded_recommender_and_verify_report_the_version(bundle):
    from llmkd.serving import Recommender

    version = manifest_of(bundle)["version"]
    rec = Recommender.from_pretrained(bundle)
    assert rec.version == version and rec.metadata()["version"] == version
    proc = run("verify", str(bundle))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert proc.stdout.strip() == f"{bundle}: version {version}, {len(manifest_of(bundle)['files'])} files match " \
                                  "manifest.json (size and sha256)"


@pytest.mark.parametrize("how", CHANGES)
def test_verify_refuses_a_changed_file_in_one_line_naming_it(copy, how):
    rel = damage(copy, how)
    proc = run("verify", str(copy))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: {copy / rel}: {CHANGES[how][1]}") and "re-export" in lines[0], lines[0]


@pytest.mark.parametrize("how", CHANGES)
def test_loading_refuses_a_changed_file_naming_it(copy, how):
    """A size or a missing file at every load; a flipped byte (same size) where hashes are asked for
    (`verify=True`, as `llmkd serve` does at start)."""
    from llmkd.serving import Recommender

    rel = damage(copy, how)
    expect = rf"^{re.escape(str(copy / rel))}: {CHANGES[how][1]}"
    with pytest.raises(LlmkdError, match=expect):
        Recommender.from_pretrained(copy, verify=True)
    if how != "flip":
        with pytest.raises(LlmkdError, match=expect):
            Recommender.from_pretrained(copy)


def test_serve_refuses_a_flipped_byte_before_it_starts(copy):
    rel = damage(copy, "flip")
    proc = run("serve", str(copy), "--port", str(free_port()), timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith(f"error: {copy / rel}: sha256 differs from manifest.json"), lines


def test_an_unlisted_file_is_refused(copy):
    """The loader reads only files the manifest vouches for (e.g. an index's side record would change it)."""
    from llmkd.serving import Recommender

    (copy / "index" / "faiss.index.json").write_text("{}")
    with pytest.raises(LlmkdError, match=rf"^{re.escape(str(copy))}/index/faiss\.index\.json: not listed in manifest\.json"):
        Recommender.from_pretrained(copy)


def test_a_bundle_without_a_manifest_is_refused_saying_to_re_export(copy):
    """Bundles exported before manifests existed are not loaded unchecked: they are re-exported."""
    from llmkd.serving import Recommender

    (copy / "manifest.json").unlink()
    with pytest.raises(LlmkdError, match=r"no manifest.json: .*re-export the bundle \(llmkd export"):
        Recommender.from_pretrained(copy)


def test_add_items_rewrites_a_manifest_that_verifies(copy):
    from llmkd.serving import Recommender
    from llmkd.serving.bundle import append_items
    from llmkd.serving.manifest import check_files

    before, n = manifest_of(copy), len(json.loads((copy / "item_ids.json").read_text()))
    dim = json.loads((copy / "teacher/teacher.json").read_text())["dim"]
    append_items(copy, ["new-1"], np.zeros((1, dim), dtype=np.float32))
    after = manifest_of(copy)
    assert check_files(copy, full=True) == after["version"] != before["version"]
    assert set(after["files"]) == set(before["files"])
    assert after["files"]["item_ids.json"] != before["files"]["item_ids.json"]
    rec = Recommender.from_pretrained(copy, verify=True)
    assert rec.version == after["version"] and rec.num_items == n + 1


def test_add_items_refuses_a_changed_bundle_instead_of_sealing_it(copy):
    """The rewrite hashes every file first: a new manifest over a damaged file would vouch for it."""
    from llmkd.serving.bundle import append_items

    rel = damage(copy, "flip")
    before = digest(copy)
    dim = json.loads((copy / "teacher/teacher.json").read_text())["dim"]
    with pytest.raises(LlmkdError, match=rf"^{re.escape(str(copy / rel))}: sha256 differs"):
        append_items(copy, ["new-1"], np.zeros((1, dim), dtype=np.float32))
    assert digest(copy) == before
