"""The process benchmark's cost model against hand-computed numbers (the measurements themselves are runs of
the real stages, tested in tests/test_teacher_shards.py and tests/test_finetune_parallel.py)."""

from __future__ import annotations

import pytest

from llmkd.experiments.processes import Cluster, Workload, launch_options, markdown, project, ring_seconds


def test_ring_all_reduce_time_by_hand():
    c = Cluster(intra_gbps=100.0, inter_gbps=10.0, intra_latency_us=10.0, inter_latency_us=20.0)
    assert ring_seconds(1e9, 1, 1, c) == 0.0
    assert ring_seconds(1e9, 8, 1, c) == pytest.approx(2 * 7 / 8 * 1e9 / 100e9 + 14 * 10e-6)
    assert ring_seconds(1e9, 8, 2, c) == pytest.approx(2 * 15 / 16 * 1e9 / 10e9 + 30 * 20e-6)


def test_projection_by_hand():
    runs = {"teacher/p1": {"throughput": 100.0, "texts": 10, "vector_bytes": 10 * 32 * 4},
            "finetune/p1": {"throughput": 10.0, "global_batch": 4, "allreduce_bytes_per_step": 1e6},
            "distill/p1": {"throughput": 1000.0, "num_parameters": 1000 + 50 * 8, "num_items": 50, "dim": 8,
                           "batch_size": 100}}
    c = Cluster(gpu_speedup=10.0, intra_gbps=100.0, inter_gbps=10.0)
    w = Workload(items=1000, lora_steps=10, interactions=10_000)
    rows = {(r["stage"], r["gpus"], r["machines"]): r for r in project(runs, c, w)}
    assert rows["teacher", 1, 1]["seconds"] == pytest.approx(1000 / 1000)
    assert rows["teacher", 8, 1]["seconds"] == pytest.approx(1000 / 8000 + 7 / 8 * 1000 * 128 / 100e9)
    assert rows["finetune", 8, 2]["seconds"] == pytest.approx(10 * (4 / 100 + ring_seconds(1e6, 8, 2, c)))
    params = 1000 + 1000 * 8  # the student's item table at the projected catalog
    assert rows["distill", 8, 1]["seconds"] == pytest.approx(10_000 / (100 * 8) * (100 / 10_000 + ring_seconds(params * 4, 8, 1, c)))
    assert "estimate" in markdown({"machine": "m", "runs": {}, "cluster": vars(c), "projection": project(runs, c, w)})


def test_launch_options_share_the_cores():
    one, two = launch_options(1, 2), launch_options(2, 2)
    assert "--multi_gpu" not in one and one[one.index("--num_cpu_threads_per_process") + 1] == "2"
    assert "--multi_gpu" in two and two[two.index("--num_cpu_threads_per_process") + 1] == "1"
