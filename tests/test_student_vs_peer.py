"""The student-vs-peer speed benchmark (llmkd.experiments.student_vs_peer): turns taken fairly, the student's
runner trains, and, where RecTools is installed, the peer's runners time a capped one-epoch fit."""

from __future__ import annotations

import math

import pytest
import torch

from llmkd.experiments.peers import PeerSettings
from llmkd.experiments.student_vs_peer import markdown, side_by_side, student_runner, student_vs_peer
from llmkd.infra.config import Config, DistillConfig, StudentConfig


def test_side_by_side_alternates_the_order_after_an_untimed_warmup():
    calls = []

    def runner(name: str, seconds: float):
        def run() -> float:
            calls.append(name)
            return seconds
        return run

    times = side_by_side({"a": runner("a", 1.0), "b": runner("b", 2.0), "c": runner("c", 3.0)}, rounds=3)
    assert calls == ["a", "b", "c", "a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert times == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}


def config(synthetic, tmp_path) -> Config:
    return Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=5),
                  student=StudentConfig(dim=8, num_layers=1, num_heads=1, pooling="sasrec", attend_padding=True),
                  distill=DistillConfig(batch_size=16))


def test_the_students_runner_trains_a_fixed_number_of_batches(synthetic, synthetic_data, tmp_path, monkeypatch):
    """Each call runs `batches` optimizer steps (cycling past the end of an epoch) and returns its seconds."""
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    run, per_epoch = student_runner(config(synthetic, tmp_path), synthetic_data, batches=3)
    seconds = [run() for _ in range(per_epoch)]  # 3 x per_epoch batches: past the end of the first epoch
    assert per_epoch >= 1 and len(steps) == 3 * per_epoch and all(s > 0 for s in seconds)


def test_student_vs_peer_times_every_system_with_ratios_to_the_student(synthetic, synthetic_data, tmp_path):
    pytest.importorskip("rectools")
    settings = PeerSettings(dim=8, heads=1, batch_size=16, max_len=5)
    result = student_vs_peer(config(synthetic, tmp_path), synthetic_data, settings, dims=[8, 16], batches=2,
                             rounds=1, threads=1, log=lambda _: None)
    systems = result["systems"]
    assert list(systems) == ["llmkd student, 8-d", "llmkd student, 16-d", "RecTools SASRec, its own loss",
                             "RecTools SASRec, loss at targets"]
    assert result["baseline"] == "llmkd student, 8-d" and systems["llmkd student, 8-d"]["epoch_vs_baseline"] == 1
    for s in systems.values():
        assert s["median_s"] > 0 and math.isfinite(s["epoch_s"]) and s["batches_per_epoch"] >= 1
        assert s["epoch_s"] == pytest.approx(s["median_s"] / 2 * s["batches_per_epoch"])
    assert "RecTools SASRec, its own loss" in markdown(result)
