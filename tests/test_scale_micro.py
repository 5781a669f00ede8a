"""The catalog-size micro-benchmarks (llmkd.experiments.scale_micro) at tiny sizes: each kind measures
what it says, and a rerun reuses finished runs (resume after a kill)."""

from __future__ import annotations

import json

import pytest

from llmkd.experiments import scale_micro


def test_each_kind_measures_its_step_in_process():
    soft = scale_micro.measure("softmax", {"n_items": 40, "loss": "sampled_softmax", "steps": 1, "batch": 2,
                                           "max_len": 4, "num_negatives": 8})
    assert soft["step_s"] > 0 and len(soft["step_times"]) == 2 and soft["peak_since_base"]
    assert soft["peak_rss_gib"] >= soft["base_rss_gib"] * 0.99 > 0
    sparse = scale_micro.measure("softmax", {"n_items": 40, "loss": "sampled_softmax", "steps": 1, "batch": 2,
                                             "max_len": 4, "num_negatives": 8, "item_updates": "sparse"})
    assert sparse["step_s"] > 0
    full = {**soft, "params": {**soft["params"], "loss": "full_softmax"}}
    ratios = scale_micro.softmax_ratios({"runs": [full, soft, sparse]})
    assert ratios[0]["time_ratio_dense_over_sparse"] == soft["step_s"] / sparse["step_s"]
    kd = scale_micro.measure("kd", {"n_items": 300, "n_rows": 40, "teacher_dim": 8, "kd_index": "flat", "k": 5,
                                    "recall_rows": 10})
    assert kd["search"] == "flat" and kd["recall_vs_exact"] == 1.0  # the exact search finds the exact top-K
    ivf = scale_micro.measure("kd", {"n_items": 3000, "n_rows": 40, "teacher_dim": 8, "kd_index": "ivf", "k": 5,
                                     "recall_rows": 40})
    assert ivf["search"] == "ivf" and 0.5 < ivf["recall_vs_exact"] <= 1.0
    small, whole = (scale_micro.measure("eval", {"n_items": 500, "n_users": 60, "item_block": b}) for b in (64, 10 ** 6))
    assert small["ndcg@10"] == whole["ndcg@10"] and small["score_block_gib"] < whole["score_block_gib"]
    index = scale_micro.measure("index", {"n_items": 500, "index_type": "flat", "dim": 8})
    assert index["ntotal"] == 500


def test_a_rerun_reuses_finished_runs_and_retries_failed_ones(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    calls = []

    def fake(kind, params, timeout=None):
        calls.append(params["n_items"])
        if params["n_items"] == 3 and len(calls) == 2:
            return {"params": params, "error": "killed"}
        return {"params": params, "step_s": 1.0, "wall_s": 1.0, "peak_rss_gib": 1.0, "base_rss_gib": 0.5}

    monkeypatch.setattr(scale_micro, "isolated", fake)
    grid = [{"n_items": n, "loss": "full_softmax"} for n in (2, 3)]
    scale_micro.run_grid("softmax", grid, out, log=lambda *_: None)
    assert calls == [2, 3] and "error" in json.loads(out.read_text())["runs"][1]
    scale_micro.run_grid("softmax", grid, out, log=lambda *_: None)
    assert calls == [2, 3, 3]  # the finished run reused, the failed one measured again
    assert [r["params"]["n_items"] for r in json.loads(out.read_text())["runs"]] == [2, 3]
    with pytest.raises(SystemExit, match="softmax"):
        scale_micro.run_grid("eval", grid, out, log=lambda *_: None)


def test_fresh_starts_a_new_file_and_keeps_the_old(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setattr(scale_micro, "isolated", lambda kind, params, timeout=None: {
        "params": params, "step_s": 2.0, "wall_s": 2.0, "peak_rss_gib": 1.0, "base_rss_gib": 0.5})
    grid = [{"n_items": 2, "loss": "full_softmax"}]
    scale_micro.run_grid("softmax", grid, out, log=lambda *_: None)
    first = out.read_text()
    scale_micro.run_grid("softmax", grid, out, log=lambda *_: None, fresh=True)
    assert (tmp_path / "r.json.prev").read_text() == first and len(json.loads(out.read_text())["runs"]) == 1


def test_the_peak_restarts_after_the_inputs_are_built():
    """A peak from building the inputs (here 0.4 GiB, freed) does not count as the measured step's."""
    import numpy as np

    big = np.ones(50_000_000)
    del big
    assert scale_micro.peak_rss_gib() > scale_micro.rss_gib() + 0.3
    assert scale_micro.reset_peak()
    assert scale_micro.peak_rss_gib() < scale_micro.rss_gib() + 0.05
