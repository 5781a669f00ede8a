"""The stage-efficiency benchmark (llmkd.experiments.stage_efficiency): FLOPs counted, seconds timed, fractions
of the measured peak, for every stage, on a tiny teacher and student."""

from __future__ import annotations

import math

import pytest
import torch

from llmkd.experiments.stage_efficiency import measure, stage_efficiency


def test_measure_counts_a_matrix_products_flops_and_its_fraction_of_the_peak():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    row = measure("one product", lambda: a @ b, reps=3, units_per_stage=10, peak=1.0)
    assert row["unit_gflop"] == pytest.approx(2 * 64 * 32 * 16 / 1e9)
    assert row["unit_s"] > 0 and row["stage_s"] == pytest.approx(10 * row["unit_s"])
    assert row["gflops"] == pytest.approx(row["unit_gflop"] / row["unit_s"])
    assert row["fraction_of_peak"] == pytest.approx(row["gflops"])  # peak 1 GFLOP/s


def test_every_stage_is_measured_on_the_configs_data(tmp_path, synthetic, tiny_bert):
    from llmkd.data import build_data, save_data
    from llmkd.infra.config import Config, DistillConfig, FinetuneConfig, StudentConfig, TeacherConfig

    save_data(build_data(synthetic.data_config()), tmp_path / "data", synthetic.data_config())
    cfg = Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                 teacher=TeacherConfig(model=str(tiny_bert), user_mode="text", batch_size=8, max_history_tokens=32),
                 finetune=FinetuneConfig(top_layers=1, batch_size=4, catalog_negatives=8, steps=30),
                 student=StudentConfig(dim=8, num_layers=1, num_heads=1),
                 distill=DistillConfig(batch_size=16, num_negatives=8))
    result = stage_efficiency(cfg, reps=1, threads=1, n_texts=8, batches=1, peak_n=256)
    stages = result["stages"]
    assert set(stages) == {"teacher_items", "teacher_histories", "lora_step", "student_epoch_full_softmax",
                           "student_epoch_sampled_softmax", "evaluate_valid"}
    for name, row in stages.items():
        assert row["unit_gflop"] > 0 and row["unit_s"] > 0, name
        assert math.isfinite(row["fraction_of_peak"]) and row["fraction_of_peak"] > 0, name
    assert stages["lora_step"]["units_per_stage"] == 30
    # the full softmax scores every item, the sampled one 8 negatives: more FLOPs per step
    assert stages["student_epoch_full_softmax"]["unit_gflop"] > stages["student_epoch_sampled_softmax"]["unit_gflop"]
    assert result["furthest_from_bound"] == min(stages, key=lambda s: stages[s]["fraction_of_peak"])
    assert result["peak_gflops"] > 0
