"""The `llmkd` command: `distill` and `finetune` run their script through Accelerate's launcher, and a user
error ends the command as it ends the script run directly: one `error:` line and exit status 2.

(`accelerate launch scripts/distill.py` itself turns the script's exit 2 into exit 1 and a traceback.)
Every case runs the real command in a subprocess, as `python -m llmkd` and, where the package is
installed with its entry points, as the `llmkd` console script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port

BAD = REPO / "tests" / "bad_inputs"
CONSOLE = Path(sys.executable).with_name("llmkd")


def env(home: Path) -> dict[str, str]:
    """Offline, one thread, an empty HF_HOME (no accelerate default config), the repository importable."""
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_HOME=str(home), OMP_NUM_THREADS="1",
             MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return e


def llmkd(*args: str, home: Path, console: bool = False) -> subprocess.CompletedProcess:
    cmd = [str(CONSOLE)] if console else [sys.executable, "-m", "llmkd"]
    return subprocess.run([*cmd, *args], cwd=REPO, env=env(home), capture_output=True, text=True, timeout=300,
                          check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess, expect: str) -> None:
    context = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, context
    assert proc.returncode == 2, context
    assert lines and lines[-1].startswith("error: ") and expect in lines[-1], context
    assert sum(line.startswith("error: ") for line in lines) == 1, context


@pytest.mark.parametrize("stage, config, expect", [
    ("distill", "config_kd_top_k_zero.yaml", "distill.kd_top_k: expected >= 1, got 0"),
    ("finetune", "config_finetune_lr_zero.yaml", "finetune.lr: expected > 0, got 0.0"),
])
def test_a_user_error_under_the_launcher_is_one_line_and_exit_2(stage, config, expect, tmp_path):
    proc = llmkd(stage, "--config", str(BAD / config), "--set", f"out_dir={tmp_path / 'run'}", home=tmp_path / "hf")
    assert_one_line_error(proc, expect)
    assert not (tmp_path / "run").exists()


def test_the_console_script_propagates_exit_2(tmp_path):
    if not CONSOLE.is_file():
        pytest.skip(f"{CONSOLE}: the package is not installed with its entry points (pip install -e .)")
    proc = llmkd("distill", "--config", str(BAD / "config_kd_top_k_zero.yaml"), "--set",
                 f"out_dir={tmp_path / 'run'}", home=tmp_path / "hf", console=True)
    assert_one_line_error(proc, "distill.kd_top_k: expected >= 1, got 0")


def test_launch_options_go_before_a_double_dash(tmp_path):
    """`llmkd distill [accelerate launch options] -- [distill.py arguments]`: two CPU processes meet the same
    bad config; one error line (each distinct line once), exit 2, no traceback from Accelerate or
    torch.distributed."""
    proc = llmkd("distill", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "--main_process_port", str(free_port()), "--",
                 "--config", str(BAD / "config_kd_top_k_zero.yaml"), "--set", f"out_dir={tmp_path / 'run'}",
                 home=tmp_path / "hf")
    assert_one_line_error(proc, "distill.kd_top_k: expected >= 1, got 0")


def test_unknown_stage_and_help(tmp_path):
    proc = llmkd("train", home=tmp_path / "hf")
    assert proc.returncode == 2 and "error: unknown command 'train'" in proc.stderr and "distill" in proc.stderr
    proc = llmkd("--help", home=tmp_path / "hf")
    assert proc.returncode == 0 and "distill" in proc.stdout and "finetune" in proc.stdout


def test_a_tiny_run_trains_through_the_launcher(tmp_path):
    """The success path: `llmkd distill` on a tiny data set (no teacher, 1 epoch) writes the student."""
    from llmkd.data import build_data, save_data
    from llmkd.infra.config import Config, from_dict

    raw = {"out_dir": str(tmp_path / "run"),
           "data": {"source": "files", "interactions": str(BAD / "ok_interactions.csv"),
                    "items": str(BAD / "ok_items.csv"), "text_template": "{title} | {genre}", "max_history": 5},
           "student": {"dim": 8, "num_layers": 1, "num_heads": 2, "dropout": 0.0},
           "distill": {"name": "student_no_kd", "alpha": 0.0, "epochs": 1, "batch_size": 8},
           "eval": {"ks": [1, 5]}}
    cfg = from_dict(Config, raw)
    save_data(build_data(cfg.data), tmp_path / "run" / "data", cfg.data)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    proc = llmkd("distill", "--config", str(tmp_path / "cfg.yaml"), home=tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "best valid ndcg@10" in proc.stdout
    assert (tmp_path / "run" / "student_no_kd" / "model.safetensors").is_file()


def test_a_failed_multi_process_run_reports_the_rank_that_failed_by_itself():
    """Rank 1 exits with 2 (a user error) and the launcher kills rank 0 (SIGTERM, -15): the run's status is
    2 whichever rank torch lists first; only signals: 128 + signal, as a shell reports it."""
    from llmkd.commands import failure_status

    assert failure_status([-15, 2]) == 2 and failure_status([2, -15]) == 2 and failure_status([2, 2]) == 2
    assert failure_status([-15, -15]) == 143 and failure_status([-9]) == 137
    # a rank torch's SIGTERM handler ends with sys.exit(-15) shows 241 (-15 & 0xff): killed, not its own error
    assert failure_status([241, 2]) == 2 and failure_status([2, 241]) == 2 and failure_status([241, 241]) == 241
    assert failure_status([0, -15]) == 143 and failure_status([0, 0]) == 1  # a failed run never reports 0
