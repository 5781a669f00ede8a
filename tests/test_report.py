"""The evaluation stage in-process (`llmkd.evaluation.report.run_evaluation`): which systems it scores and what it
writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmkd.data import build_data, save_data
from llmkd.evaluation.metrics import evaluate_scores, summarize
from llmkd.evaluation.report import run_evaluation
from llmkd.infra.config import Config, DistillConfig, EvalConfig, TeacherConfig
from llmkd.teacher import TeacherCache, build_teacher_cache


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, synthetic, tiny_bert):
    """A run folder with data and two teacher caches: `teacher` (history text) and `teacher_mean`
    (mean of history item vectors), so their scores differ."""
    out = tmp_path_factory.mktemp("report") / "run"
    cfg = Config(out_dir=str(out), data=synthetic.data_config(max_history=8))
    data = build_data(cfg.data)
    save_data(data, out / "data", cfg.data)
    for folder, mode in (("teacher", "text"), ("teacher_mean", "mean_items")):
        build_teacher_cache(data, TeacherConfig(model=str(tiny_bert), batch_size=8, max_history_tokens=128,
                                                user_mode=mode), out / folder)
    return out, data


def evaluate(out, teacher: str) -> dict:
    cfg = Config(out_dir=str(out), distill=DistillConfig(teacher=teacher),
                 eval=EvalConfig(ks=[1, 10], students=[], bootstrap=10))
    run_evaluation(cfg)
    return json.loads((out / "eval" / "metrics.json").read_text())


def expected(out, data, folder: str) -> dict:
    fn = TeacherCache(out / folder, data).scorer()
    return {s: summarize(evaluate_scores(data, s, fn, [1, 10])) for s in ("valid", "test")}


@pytest.mark.parametrize("folder, label", [("teacher_mean", "teacher (teacher_mean)"), ("teacher", "teacher")])
def test_the_teacher_evaluated_is_the_one_distill_teacher_names(two_teachers, folder, label):
    out, data = two_teachers
    mine, other = expected(out, data, folder), expected(out, data, "teacher" if folder != "teacher" else "teacher_mean")
    assert mine != other  # the two caches rank differently, so the check below tells them apart
    metrics = evaluate(out, folder)
    assert set(metrics) == {"popularity", label}
    for split in mine:
        assert metrics[label][split] == pytest.approx(mine[split]), split
    md = (out / "eval" / "results.md").read_text()
    assert f"| {label} |" in md and f"| {folder} |" in md  # the metrics row and the stage-cost row


def test_the_protocol_is_written_next_to_the_metrics(two_teachers):
    """The repeated-interaction rule is stated in eval/protocol.json, eval/meta.json and results.md, while
    metrics.json keeps its {system: {split: metrics}} layout."""
    out, data = two_teachers
    metrics = evaluate(out, "teacher")
    assert set(metrics) == {"popularity", "teacher"}
    assert all(set(by) == {"valid", "test"} for by in metrics.values())
    protocol = json.loads((out / "eval" / "protocol.json").read_text())
    assert "miss" in protocol["rules"]["repeated_interactions"]
    repeats = {s: sum(data.targets(s)[u] in data.history(u, s) for u in data.eval_users(s)) for s in ("valid", "test")}
    assert protocol["repeated_targets"] == repeats
    assert json.loads((out / "eval" / "meta.json").read_text())["protocol"] == protocol
    md = (out / "eval" / "results.md").read_text()
    assert "repeated interaction" in md and f"{repeats['test']} of {metrics['teacher']['test']['users']} test users" in md


def test_a_user_sample_is_explicit_and_the_same_for_every_system(two_teachers):
    """eval.max_users: N users per split drawn once (seeded), every system scored on exactly them (each
    system's per-user metrics equal the full run's rows for those users), and the sample is stated."""
    from llmkd.evaluation.metrics import sample_users

    out, data = two_teachers
    n = len(data.eval_users("test")) // 3
    cfg = Config(out_dir=str(out), distill=DistillConfig(teacher="teacher"),
                 eval=EvalConfig(ks=[1, 10], students=[], bootstrap=10, max_users=n, sample_seed=3))
    run_evaluation(cfg)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    protocol = json.loads((out / "eval" / "protocol.json").read_text())
    for s in ("valid", "test"):
        users = sample_users(data, s, n, 3)
        assert len(users) == n < len(data.eval_users(s)) and set(users) <= set(data.eval_users(s))
        assert protocol["user_sample"][s] == {"evaluated": n, "of": len(data.eval_users(s)), "seed": 3}
        full = evaluate_scores(data, s, TeacherCache(out / "teacher", data).scorer(), [1, 10])
        rows = np.searchsorted(data.eval_users(s), users)
        for system in ("popularity", "teacher"):
            assert metrics[system][s]["users"] == n
        assert metrics["teacher"][s]["ndcg@10"] == pytest.approx(full["ndcg@10"][rows].mean())
    assert "A random sample** of" in (out / "eval" / "results.md").read_text()
