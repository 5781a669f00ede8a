"""Two runs, one artifact: a second run is refused at once (one line naming the holder) or waits when
asked to; a lock left by a killed run is taken over and reported; a lock leaves no file behind.

The holder is a real second process (`HOLD`), holding the locks of the folders it is given.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, TEXT_TEMPLATE

from llmkd.infra.artifacts import LlmkdError, atomic_dir, read_meta, write_json
from llmkd.infra.locks import WAIT_ENV, artifact_lock, lock_path

HOLD = """
import contextlib, sys, time
from pathlib import Path
from llmkd.infra.locks import artifact_lock
with contextlib.ExitStack() as stack:
    for folder in sys.argv[3:]:
        stack.enter_context(artifact_lock(folder))
    Path(sys.argv[1]).write_text("held")
    time.sleep(float(sys.argv[2]))
    Path(sys.argv[1]).write_text("done")  # still holding: a run that reads "held" got in before the release
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture
def hold(tmp_path):
    """hold(folders, seconds) -> the process holding their locks (killed at the end of the test, its lock
    files removed as a release would); its `flag` file says "held", then "done" just before it releases."""
    procs, held = [], []

    def start(folders: list[Path], seconds: float = 120.0) -> subprocess.Popen:
        flag = tmp_path / f"held_{len(procs)}"
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(flag), str(seconds), *map(str, folders)],
                                env=_env(), cwd=REPO)
        procs.append(proc)
        held.extend(folders)
        deadline = time.time() + 60
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert flag.exists(), "the holder never took its locks"
        proc.flag = flag
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for folder in held:
        lock_path(folder).unlink(missing_ok=True)


def test_a_held_artifact_is_refused_at_once_naming_the_holder(tmp_path, hold, monkeypatch, capsys):
    folder = tmp_path / "run" / "student_kd"
    proc = hold([folder])
    monkeypatch.delenv(WAIT_ENV, raising=False)
    with pytest.raises(LlmkdError) as e, artifact_lock(folder):
        pass
    assert "waiting" not in capsys.readouterr().err  # refused without waiting for the holder
    msg = str(e.value)
    assert msg.startswith(f"{folder}: in use by pid {proc.pid} on {socket.gethostname()}, since ")
    assert "--wait-lock" in msg and "\n" not in msg


def test_waiting_for_a_held_artifact(tmp_path, hold, monkeypatch, capsys):
    """With LLMKD_WAIT_LOCK (what --wait-lock sets) the run waits for the holder, says so once, then runs."""
    folder = tmp_path / "index"
    holder = hold([folder], seconds=1.5)
    monkeypatch.setenv(WAIT_ENV, "60")
    with atomic_dir(folder) as tmp:
        assert holder.flag.read_text() == "done"  # in only once the holder had finished
        write_json(tmp / "meta.json", {"stage": "index"})
    assert capsys.readouterr().err.count("in use by pid") == 1
    monkeypatch.setenv(WAIT_ENV, "soon")
    with pytest.raises(LlmkdError, match="LLMKD_WAIT_LOCK='soon': expected seconds"), artifact_lock(folder):
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over_and_reported(tmp_path, hold, capsys):
    folder = tmp_path / "teacher"
    proc = hold([folder])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_path(folder).is_file()  # the killed run could not remove it
    with artifact_lock(folder):
        pass
    err = capsys.readouterr().err
    assert f"took over the lock of pid {proc.pid} on {socket.gethostname()}" in err and err.count("\n") == 1
    assert not lock_path(folder).exists()


def test_a_reader_removes_the_lock_left_by_a_killed_run(tmp_path, hold, capsys):
    """The next run that only reads the artifact takes the dead run's lock over too (and says so)."""
    folder = tmp_path / "student_kd"
    folder.mkdir()
    write_json(folder / "meta.json", {"stage": "student"})
    proc = hold([folder])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_meta(folder, "student") == {"stage": "student"}
    assert f"took over the lock of pid {proc.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held_0", "student_kd"]


def test_the_lock_is_reentrant_and_leaves_no_file(tmp_path):
    """A stage holding its artifact's lock writes it through atomic_dir (which takes the same lock)."""
    folder = tmp_path / "eval"
    with artifact_lock(folder):
        with atomic_dir(folder) as tmp:
            (tmp / "metrics.json").write_text("{}")
        assert lock_path(folder).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


# ---------------------------------------------------------------- every writing stage


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory, synthetic, tiny_bert):
    """A finished tiny run (data, teacher, student_kd) and its config."""
    from llmkd.data import build_data, save_data
    from llmkd.distill import train
    from llmkd.infra.config import Config, from_dict
    from llmkd.teacher import build_teacher_cache

    root = tmp_path_factory.mktemp("locks_run")
    raw = {"out_dir": str(root / "run"),
           "data": {"source": "files", "interactions": str(synthetic.interactions), "items": str(synthetic.items),
                    "text_template": TEXT_TEMPLATE, "max_history": 8},
           "teacher": {"model": str(tiny_bert), "batch_size": 16, "max_item_tokens": 16, "max_history_tokens": 64},
           "student": {"dim": 8, "num_layers": 1, "num_heads": 2, "dropout": 0.0},
           "distill": {"name": "student_kd", "alpha": 1.0, "kd_top_k": 5, "epochs": 1, "batch_size": 8},
           "finetune": {"steps": 2, "eval_every": 1, "batch_size": 4, "catalog_negatives": 4},
           "eval": {"ks": [10, 50], "students": ["student_kd"], "bootstrap": 10}}
    cfg = from_dict(Config, raw)
    data = build_data(cfg.data)
    save_data(data, root / "run" / "data", cfg.data)
    build_teacher_cache(data, cfg.teacher, root / "run" / "teacher")
    train(cfg)
    yaml_path = root / "run.yaml"
    yaml_path.write_text(yaml.safe_dump(raw))
    return cfg, yaml_path


def _stages():
    """name -> (artifact folder under out_dir, call(cfg) that writes it)."""
    from llmkd.data import load_data, save_data
    from llmkd.distill import train
    from llmkd.distill.recipe import run_search
    from llmkd.evaluation.report import run_evaluation
    from llmkd.experiments.coldstart import run_cold_start
    from llmkd.experiments.kd_benchmark import run_kd_benchmark
    from llmkd.experiments.seeds import run_seeds
    from llmkd.index import build_index, save_index
    from llmkd.teacher import build_teacher_cache
    from llmkd.teacher.finetune import finetune_teacher

    one = {"user_align": (["distill.alpha=0"], {"distill.user_align": [1.0]})}

    def data(cfg):
        return load_data(Path(cfg.out_dir) / "data")

    def index(cfg):
        save_index(build_index(np.ones((4, 8), "float32"), cfg.index), list("abcd"),
                   Path(cfg.out_dir) / "index", cfg.index, "fp", "student_kd")

    return {
        "data": ("data", lambda cfg: save_data(data(cfg), Path(cfg.out_dir) / "data", cfg.data)),
        "teacher": ("teacher", lambda cfg: build_teacher_cache(data(cfg), cfg.teacher, Path(cfg.out_dir) / "teacher",
                                                               force=True)),
        "finetune": ("teacher_lora", lambda cfg: finetune_teacher(data(cfg), cfg, force=True)),
        "distill": ("student_kd", train),
        "index": ("index", index),
        "eval": ("eval", run_evaluation),
        "recipe search": ("tune", lambda cfg: run_search(cfg, one)),
        "seeds": ("seeds_report", lambda cfg: run_seeds(cfg, [0])),
        "kd benchmark": ("kd_benchmark", lambda cfg: run_kd_benchmark(cfg, [0], families=one)),
        "cold start": ("cold_start", lambda cfg: run_cold_start(cfg, ["student_kd"])),
    }


@pytest.mark.parametrize("stage", list(_stages()))
def test_every_writing_stage_refuses_a_held_artifact_before_any_work(run_cfg, hold, stage, capsys):
    cfg, _ = run_cfg
    folder, call = _stages()[stage]
    out = Path(cfg.out_dir)
    proc = hold([out / folder])
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(LlmkdError, match=f"in use by pid {proc.pid} "):
        call(cfg)
    assert capsys.readouterr() == ("", ""), "the refused run began its work (progress or log lines)"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before, "the refused run wrote files"


def test_distill_script_refuses_a_running_student_or_waits_for_it(run_cfg, hold, tmp_path):
    """Two scripts/distill.py runs on one student (they would share checkpoints/<name>/): the second exits 2
    with one line at once; with --wait-lock it trains once the first is done."""
    cfg, config = run_cfg
    out = Path(cfg.out_dir)
    args = [sys.executable, "scripts/distill.py", "--config", str(config), "--set", "distill.name=student_twice"]
    proc = hold([out / "student_twice"])
    refused = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines() == [f"error: {out / 'student_twice'}: in use by pid {proc.pid} on "
                                           + refused.stderr.split(f"pid {proc.pid} on ", 1)[1].strip()]
    assert not (out / "checkpoints" / "student_twice").exists() and not (out / "student_twice").exists()
    proc.kill()
    proc.wait()

    holder = hold([out / "student_twice"])  # held until the waiting run says it waits
    waiting = subprocess.Popen([*args, "--wait-lock"], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(300, waiting.kill)  # a run that never says it waits ends the loop below
    guard.start()
    said = []
    for line in waiting.stderr:
        said.append(line)
        if "; waiting" in line:
            break
    holder.kill()
    stderr = "".join(said) + waiting.communicate(timeout=300)[1]
    guard.cancel()
    assert waiting.returncode == 0, stderr
    assert "in use by pid" in stderr and (out / "student_twice" / "model.safetensors").is_file()
