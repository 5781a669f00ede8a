"""Teacher encoding in shards: the same vectors whatever the shard size (to float noise) or the number of
processes (exactly), and a run killed between shards resumes from the finished ones to the same bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import yaml
from conftest import REPO, free_port
from safetensors.numpy import load_file

from llmkd.data import load_data
from llmkd.infra.config import TeacherConfig, load_config
from llmkd.teacher import build_teacher_cache
from llmkd.teacher.shards import SHARD_PAUSE_ENV, bounds, shards_root, write_shard

KEYS = ("item_emb", "user_kd", "user_valid", "user_test", "user_pos", "pos_user", "pos_cut")


def arrays(folder) -> dict[str, np.ndarray]:
    return load_file(str(folder / "embeddings.safetensors"))


def test_shard_bounds_cover_every_row_once():
    assert bounds(10, 4) == [(0, 4), (4, 8), (8, 10)] and bounds(8, 4) == [(0, 4), (4, 8)] and bounds(0, 4) == []


def test_small_shards_give_the_vectors_of_one_shard(tmp_path, tiny_bert, synthetic_data):
    """40 items, 30 users, positions every 2nd cut, in shards of 7 rows: the vectors of the one-shard cache
    (batches are cut differently, so float noise only); no shard is left behind."""
    one = TeacherConfig(model=str(tiny_bert), batch_size=4, max_history_tokens=64, position_stride=2)
    small = TeacherConfig(**{**one.__dict__, "shard_size": 7})
    build_teacher_cache(synthetic_data, one, tmp_path / "one")
    meta = build_teacher_cache(synthetic_data, small, tmp_path / "small")
    n_pos = len(arrays(tmp_path / "one")["pos_user"])
    assert meta["shards"] == {"shards": 6 + 3 * 5 + -(-n_pos // 7), "reused": 0, "shard_size": 7, "processes": 1}
    a, b = arrays(tmp_path / "one"), arrays(tmp_path / "small")
    assert sorted(a) == sorted(b) == sorted(KEYS)
    for k in KEYS:
        np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), atol=1e-3 if k == "user_pos" else 1e-5,
                                   err_msg=k)
    assert not shards_root(tmp_path / "small").exists()
    # the shard size changes nothing the cache stands for: a cache built in other shards is reused
    assert build_teacher_cache(synthetic_data, one, tmp_path / "small")["reused"] is True


def _run_dir(tmp_path, synthetic, tiny_bert, shard_size: int = 7) -> str:
    """A prepared tiny run (data) and its config file; returns the config path."""
    from llmkd.data import build_data, save_data
    from llmkd.infra.config import Config, from_dict

    raw = {"out_dir": str(tmp_path / "run"),
           "data": {"source": "files", "interactions": str(synthetic.interactions), "items": str(synthetic.items),
                    "text_template": "{title} | {genre}", "max_history": 8},
           "teacher": {"model": str(tiny_bert), "batch_size": 4, "max_history_tokens": 64, "position_stride": 2,
                       "shard_size": shard_size}}
    cfg = from_dict(Config, raw)
    save_data(build_data(cfg.data), tmp_path / "run" / "data", cfg.data)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(tmp_path / "cfg.yaml")


def _env(tmp_path, **extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO), **extra}


def _teacher(tmp_path, *args: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmkd", "teacher", *args], cwd=REPO, env=_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=300, check=False)


def test_two_processes_write_the_vectors_of_one(tmp_path, synthetic, tiny_bert):
    """`llmkd teacher --multi_gpu --num_processes 2 -- ...` shares the shards out between two CPU processes of
    one run and writes the same bytes as one process."""
    config = _run_dir(tmp_path, synthetic, tiny_bert)
    one = _teacher(tmp_path, "--config", config, "--name", "teacher_1")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _teacher(tmp_path, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--main_process_port", str(free_port()), "--",
                   "--config", config, "--name", "teacher_2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("teacher cache built") == 1, two.stdout  # printed by the main process only
    out = tmp_path / "run"
    meta = json.loads((out / "teacher_2" / "meta.json").read_text())
    assert meta["shards"]["processes"] == 2 and meta["shards"]["shards"] > 2
    a, b = arrays(out / "teacher_1"), arrays(out / "teacher_2")
    assert sorted(a) == sorted(b) == sorted(KEYS)
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_run_killed_between_shards_resumes_from_them(tmp_path, synthetic, tiny_bert):
    """SIGKILL after the first shard is written; the rerun reuses that shard, encodes the rest and writes the
    bytes of an uninterrupted run."""
    config = _run_dir(tmp_path, synthetic, tiny_bert)
    straight = _teacher(tmp_path, "--config", config, "--name", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    flag = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "llmkd", "teacher", "--config", config, "--name", "killed"],
                            cwd=REPO, env=_env(tmp_path, **{SHARD_PAUSE_ENV: str(flag)}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not flag.exists():
        time.sleep(0.05)
    assert flag.exists(), "the run never reached its first shard"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = tmp_path / "run"
    assert not (out / "killed").exists(), "a killed run must not leave a cache"
    written = list(shards_root(out / "killed").rglob("*.safetensors"))
    assert [p.name for p in written] == ["item_emb-00000.safetensors"]
    assert not list(shards_root(out / "killed").rglob(".*tmp-*"))
    shutil.copytree(shards_root(out / "killed"), tmp_path / "left")

    resumed = _teacher(tmp_path, "--config", config, "--name", "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 reused from a killed run" in resumed.stdout, resumed.stdout
    meta = json.loads((out / "killed" / "meta.json").read_text())
    assert meta["shards"]["reused"] == 1 and meta["shards"]["shards"] > 1
    assert not shards_root(out / "killed").exists()
    a, b = arrays(out / "straight"), arrays(out / "killed")
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    # the finished shard is read back, not encoded again: marked values in it reach the cache
    shutil.copytree(tmp_path / "left", shards_root(out / "marked"))
    marker = np.full((7, 32), 0.5, np.float32)
    write_shard(next(shards_root(out / "marked").rglob("item_emb-00000.safetensors")), marker)
    cfg = load_config(config)
    assert build_teacher_cache(load_data(out / "data"), cfg.teacher, out / "marked")["shards"]["reused"] == 1
    marked = arrays(out / "marked")
    np.testing.assert_array_equal(marked["item_emb"][:7], marker)
    np.testing.assert_array_equal(marked["item_emb"][7:], a["item_emb"][7:])


def test_shards_of_other_inputs_are_never_reused(tmp_path, tiny_bert, synthetic_data):
    """A shard folder left by a run with other settings is dropped, not read: the cache equals a fresh one."""
    cfg = TeacherConfig(model=str(tiny_bert), batch_size=4, max_history_tokens=64, shard_size=7)
    stale = shards_root(tmp_path / "t") / "0123456789abcdef"
    stale.mkdir(parents=True)
    write_shard(stale / "item_emb-00000.safetensors", np.ones((7, 32), np.float32))
    meta = build_teacher_cache(synthetic_data, cfg, tmp_path / "t")
    assert meta["shards"]["reused"] == 0 and not shards_root(tmp_path / "t").exists()
    assert not np.allclose(arrays(tmp_path / "t")["item_emb"][:7], 1.0)
