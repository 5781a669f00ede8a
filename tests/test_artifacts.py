"""Atomic artifact folders: a failure at any point leaves the previous artifact intact, nothing half-written."""

from __future__ import annotations

import pytest

from llmkd.artifacts import atomic_dir, read_meta, write_json


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir())


def test_failure_midway_keeps_the_previous_artifact(tmp_path):
    final = tmp_path / "student"
    with atomic_dir(final) as tmp:
        write_json(tmp / "meta.json", {"stage": "student", "version": 1})
        (tmp / "model.safetensors").write_bytes(b"old weights")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed while writing")
    assert read_meta(final, "student")["version"] == 1
    assert (final / "model.safetensors").read_bytes() == b"old weights"
    assert _siblings(final) == ["student"]  # no temporary or old sibling left behind


def test_keyboard_interrupt_before_first_write_leaves_nothing(tmp_path):
    final = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final):
            raise KeyboardInterrupt
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_success_replaces_the_folder_whole(tmp_path):
    final = tmp_path / "eval"
    with atomic_dir(final) as tmp:
        (tmp / "stale.json").write_text("{}")
    with atomic_dir(final) as tmp:
        (tmp / "metrics.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == ["metrics.json"]
    assert _siblings(final) == ["eval"]
