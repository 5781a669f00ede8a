"""The student-step benchmark (llmkd.experiments.student_step): what it counts, and that it times every setting."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from llmkd.experiments.student_step import student_step_cost, tower_tokens


def test_tower_tokens_counts_each_groups_width_times_its_rows():
    lengths = torch.tensor([1, 1, 2, 8, 3, 1])  # sorted: 1 1 1 2 3 8
    real = torch.arange(8)[None, :] >= (8 - lengths)[:, None]  # left-padded
    assert tower_tokens(real, 1) == 6 * 8
    assert tower_tokens(real, 2) == 3 * 1 + 3 * 8
    assert tower_tokens(real, 3) == 2 * 1 + 2 * 2 + 2 * 8
    assert tower_tokens(real, 6) == int(lengths.sum())  # one row a group: no padding left


def test_the_benchmark_times_every_setting_on_the_configs_data(tmp_path, synthetic):
    from llmkd.data import build_data, save_data
    from llmkd.infra.config import Config, DistillConfig, StudentConfig

    save_data(build_data(synthetic.data_config()), tmp_path / "data", synthetic.data_config())
    cfg = Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                 student=StudentConfig(dim=8, num_layers=1, num_heads=1),
                 distill=DistillConfig(loss="full_softmax", batch_size=16))
    result = student_step_cost(cfg, [1, 4], batches=2, reps=1)
    one, four = result["settings"]
    assert (one["length_groups"], four["length_groups"]) == (1, 4) and one["speedup_over_1"] == 1.0
    assert four["step_s"] > 0 and four["speedup_over_1"] == one["step_s"] / four["step_s"]
    assert four["tower_tokens_per_batch"] < one["tower_tokens_per_batch"] == 16 * 8
    assert result["batches_per_epoch"] > 0 and result["positions_per_batch"] > 0


def test_the_script_writes_its_json(tmp_path, synthetic):
    from llmkd.data import build_data, save_data

    save_data(build_data(synthetic.data_config()), tmp_path / "data", synthetic.data_config())
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"out_dir": str(tmp_path), "data": synthetic.data_config(max_history=8).__dict__,
                               "student": {"dim": 8, "num_layers": 1, "num_heads": 1},
                               "distill": {"loss": "full_softmax", "batch_size": 16}}))
    out = tmp_path / "step.json"
    done = subprocess.run([sys.executable, "scripts/benchmark_student_step.py", "--config", str(cfg), "--groups", "1",
                           "2", "--batches", "1", "--reps", "1", "--output", str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert [s["length_groups"] for s in json.loads(out.read_text())["settings"]] == [1, 2]
