"""Atomic artifact folders: a failure at any point leaves the previous artifact intact, nothing half-written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO

from llmkd.infra.artifacts import SWAP_PAUSE_ENV, LlmkdError, atomic_dir, read_meta, write_json


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


def test_a_users_file_where_the_artifact_goes_is_refused_untouched(tmp_path):
    """The swap would move the file aside and fail to delete it: refused before anything is written."""
    final = tmp_path / "data"
    final.write_text("my notes\n")
    with pytest.raises(LlmkdError, match=rf"^{re.escape(str(final))}: is a file; expected an artifact folder"), \
            atomic_dir(final) as tmp:
        (tmp / "meta.json").write_text("{}")
    assert final.read_text() == "my notes\n"
    assert _siblings(final) == ["data"]


def test_a_symbolic_link_where_the_artifact_goes_is_refused_untouched(tmp_path):
    """A link (to a folder or a file) would be replaced by the new folder, not followed: refused."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("x")
    final = tmp_path / "student"
    final.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LlmkdError, match=rf"^{re.escape(str(final))}: is a symbolic link"), atomic_dir(final):
        pass
    assert final.is_symlink() and (final / "keep.txt").read_text() == "x"
    assert _siblings(final) == ["elsewhere", "student"]


def test_prepare_refuses_a_users_file_at_data_in_one_line(tmp_path, synthetic):
    """`<out_dir>/data` is the user's file: exit 2, one `error:` line, the file intact, no hidden sibling."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "data").write_text("my notes\n")
    proc = _prepare(_data_config(tmp_path, synthetic, 8))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    expect = (f"error: {run / 'data'}: is a file; expected an artifact folder (or nothing) there; move the file or "
              "write the artifact elsewhere")
    assert err.strip().splitlines() == [expect], err[-3000:]
    assert (run / "data").read_text() == "my notes\n"
    assert sorted(p.name for p in run.iterdir()) == ["data"]


# ---------------------------------------------------------------- a run killed inside the swap


def _prepare(config, **env):
    """scripts/prepare_data.py as a subprocess (no torch import: quick)."""
    return subprocess.Popen([sys.executable, "scripts/prepare_data.py", "--config", str(config)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _data_config(tmp_path, synthetic, max_history: int):
    cfg = {"out_dir": str(tmp_path / "run"),
           "data": {"source": "files", "interactions": str(synthetic.interactions), "items": str(synthetic.items),
                    "text_template": "{title} | {genre}", "max_history": max_history}}
    path = tmp_path / f"data_{max_history}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kill_in_swap(tmp_path, config) -> int:
    """Run prepare_data.py over an existing data/ and SIGKILL it between the swap's two renames; its pid."""
    flag = tmp_path / "in_swap"
    proc = _prepare(config, **{SWAP_PAUSE_ENV: str(flag)})
    deadline = time.time() + 60
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert flag.exists(), f"never reached the swap: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return proc.pid


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("next_run", ["reader", "writer"])
def test_a_kill_between_the_two_renames_is_recovered_by_the_next_run(tmp_path, synthetic, next_run):
    """Killed with SIGKILL between `final -> .old-PID` and `.tmp-PID -> final`: no data/ is left, only the
    two hidden siblings (and its lock file). The next run that reads (load_data) or writes (prepare_data.py) the artifact
    finishes the swap (the .tmp- is complete), removes the leftovers and says so in one line."""
    from llmkd.data import load_data

    run = tmp_path / "run"
    first = _prepare(_data_config(tmp_path, synthetic, 8))
    assert first.wait() == 0, first.communicate()
    before = json.loads((run / "data" / "meta.json").read_text())
    pid = _kill_in_swap(tmp_path, _data_config(tmp_path, synthetic, 9))
    assert not (run / "data").exists()
    assert [n for n in _hidden(run) if n != ".data.lock"] == [f".data.old-{pid}", f".data.tmp-{pid}"]

    if next_run == "reader":
        load_data(run / "data")
    else:
        again = _prepare(_data_config(tmp_path, synthetic, 9))
        _, err = again.communicate()
        assert again.returncode == 0, err
        assert err.count(f"recovered from an interrupted write: finished the swap of pid {pid}") == 1, err
    after = json.loads((run / "data" / "meta.json").read_text())
    assert after["config"]["max_history"] == 9 and before["config"]["max_history"] == 8  # the killed run's data
    assert _hidden(run) == [], "leftovers of the killed run remain"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _artifact(folder, version):
    folder.mkdir()
    write_json(folder / "meta.json", {"stage": "student", "version": version})


def test_a_half_written_tmp_and_a_cut_clean_up_are_removed(tmp_path, capsys):
    """Killed while writing (a partial .tmp-) or after the swap (an .old- beside the new artifact): the
    artifact in place is kept, the leftovers go, with one line."""
    final, pid = tmp_path / "student", _dead_pid()
    _artifact(final, 2)
    _artifact(tmp_path / f".student.tmp-{pid}", 3)
    _artifact(tmp_path / f".student.old-{pid + 1}", 1)
    assert read_meta(final, "student")["version"] == 2
    assert _siblings(final) == ["student"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"removed .student.tmp-{pid}" in err and f"removed .student.old-{pid + 1}" in err


def test_without_the_new_artifact_the_previous_one_is_restored(tmp_path, capsys):
    """An .old- with no artifact and no complete .tmp- of the same run: the previous artifact comes back."""
    final, pid = tmp_path / "index", _dead_pid()
    _artifact(tmp_path / f".index.old-{pid}", 1)
    with atomic_dir(final) as tmp:
        assert read_meta(final, "student")["version"] == 1
        write_json(tmp / "meta.json", {"stage": "student", "version": 2})
    assert read_meta(final, "student")["version"] == 2
    assert _siblings(final) == ["index"]
    assert f"restored the previous artifact (pid {pid}" in capsys.readouterr().err
