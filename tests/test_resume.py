"""Exact resume: a distillation run killed with SIGKILL mid-epoch and resumed ends where an
uninterrupted run with the same seed ends (weights and validation metrics)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import REPO
from safetensors.numpy import load_file


def _write_config(tmp_path, synthetic, name) -> str:
    cfg = {
        "out_dir": str(tmp_path / "run"),
        "data": {"source": "files", "interactions": str(synthetic.interactions), "items": str(synthetic.items),
                 "text_template": "{title} | {genre}", "max_history": 8},
        "student": {"dim": 8, "num_layers": 1, "num_heads": 1, "dropout": 0.2},
        "distill": {"name": name, "alpha": 0.0, "epochs": 5, "patience": 10, "batch_size": 4,
                    "checkpoint_every": 1, "seed": 3},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _distill(config, *extra, **kw):
    return subprocess.run([sys.executable, "scripts/distill.py", "--config", config, *extra], cwd=REPO,
                          env=_env(), capture_output=True, text=True, **kw)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, synthetic):
    straight = _write_config(tmp_path, synthetic, "straight")
    killed = _write_config(tmp_path, synthetic, "killed")
    prep = subprocess.run([sys.executable, "scripts/prepare_data.py", "--config", straight], cwd=REPO, env=_env(),
                          capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    ref = _distill(straight)
    assert ref.returncode == 0, ref.stderr

    state_file = tmp_path / "run" / "checkpoints" / "killed" / "last" / "train_state.json"
    proc = subprocess.Popen([sys.executable, "scripts/distill.py", "--config", killed], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        try:
            seen = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            seen = None
        if seen and seen["epoch"] >= 1 and seen["step"] >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    if proc.returncode == 0:
        pytest.fail("the run finished before it could be killed mid-epoch; make it longer")
    assert proc.returncode == -signal.SIGKILL and seen is not None
    assert not (tmp_path / "run" / "killed").exists(), "a killed run must not leave a student artifact"

    resumed = _distill(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    a = load_file(str(tmp_path / "run" / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=0, err_msg=k)
    ha = json.loads((tmp_path / "run" / "straight" / "meta.json").read_text())["history"]
    hb = json.loads((tmp_path / "run" / "killed" / "meta.json").read_text())["history"]
    for ra, rb in zip(ha, hb, strict=True):
        for key in ("ndcg@10", "recall@10", "recall@50", "train_loss"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["epoch"], key)


def test_a_kill_during_the_checkpoint_swap_leaves_a_saveable_folder(tmp_path):
    """A kill after the new checkpoint was renamed to `last` but before `last.old` was fully removed leaves
    both; the next save must still rotate (it failed with 'Directory not empty'), and the newest wins on load."""
    import torch
    from accelerate import Accelerator

    from llmkd.infra.checkpoints import load_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    ckpt = tmp_path / "ckpt"
    save_checkpoint(accelerator, ckpt, {"epoch": 1})
    save_checkpoint(accelerator, ckpt, {"epoch": 2})
    (ckpt / "last.old").mkdir()  # what an interrupted clean-up of the previous swap leaves
    (ckpt / "last.old" / "leftover.bin").write_bytes(b"half-removed")
    with torch.no_grad():
        model.weight.fill_(3.0)
    save_checkpoint(accelerator, ckpt, {"epoch": 3})
    assert sorted(p.name for p in ckpt.iterdir()) == ["last"]
    with torch.no_grad():
        model.weight.zero_()
    assert load_checkpoint(accelerator, ckpt)["epoch"] == 3
    assert torch.equal(model.weight, torch.full((2, 2), 3.0))
