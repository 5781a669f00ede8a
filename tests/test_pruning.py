"""Pruning the recipe search (llmkd.distill.pruning): the training loop stops when told, a pruned run is never taken
for a finished one and resumes, Optuna's successive halving stops the candidate that falls behind, and the
search never chooses a pruned candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_recipe import run_dir  # noqa: F401 - the recipe tests' fixture (out_dir with data, a fake clock)


def tiny(tmp_path: Path, synthetic, name: str, epochs: int):
    from llmkd.infra.config import Config, DistillConfig, StudentConfig

    return Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                  student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0),
                  distill=DistillConfig(name=name, alpha=0.0, epochs=epochs, patience=10, batch_size=64))


def test_a_run_told_to_stop_is_exported_as_pruned_never_reused_as_finished_and_resumes(tmp_path, synthetic):
    from llmkd import distill
    from llmkd.data import build_data, load_data, save_data
    from llmkd.infra.reuse import reusable

    cfg = tiny(tmp_path, synthetic, "run", epochs=4)
    save_data(build_data(cfg.data), tmp_path / "data", cfg.data)
    seen = []
    result = distill.train(cfg, on_epoch=lambda epoch, ndcg: seen.append((epoch, ndcg)) or epoch == 2)
    assert [e for e, _ in seen] == [1, 2] and result["pruned_at_epoch"] == 2 and result["epochs_run"] == 2
    assert [n for _, n in seen] == [r["ndcg@10"] for r in result["history"]]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["pruned_at_epoch"] == 2 and meta["epochs_run"] == 2
    fingerprint, n = load_data(tmp_path / "data").fingerprint, load_data(tmp_path / "data").num_items
    assert not reusable(tmp_path / "run", cfg, fingerprint, n)  # not a run that early stopping ended
    assert reusable(tmp_path / "run", cfg, fingerprint, n, pruned_ok=True)

    replayed = []
    again = distill.train(cfg, resume=True, on_epoch=lambda epoch, ndcg: replayed.append(epoch) or epoch == 1)
    assert replayed == [1] and again["pruned_at_epoch"] == 1 and again["epochs_run"] == 2  # earlier epochs reported first
    resumed = distill.train(cfg, resume=True)  # no pruner: it goes on to its cap
    assert resumed["pruned_at_epoch"] is None and resumed["epochs_run"] == 4
    assert resumed["history"][:2] == result["history"]
    assert reusable(tmp_path / "run", cfg, fingerprint, n)


@pytest.mark.parametrize("jobs_share_the_journal", [False, True])
def test_successive_halving_stops_the_candidate_that_falls_behind(tmp_path, monkeypatch, jobs_share_the_journal):
    """Three candidates in order with made-up valid curves (fast: training is faked): the first always goes
    on (nothing to compare with), one far below it is stopped at the first rung (epoch 2), one above it
    trains to the end; the study records them COMPLETE, PRUNED, COMPLETE. The journal is reopened per
    candidate, as worker processes do."""
    from optuna.trial import TrialState

    from llmkd import distill
    from llmkd.distill.pruning import Pruning, train_pruned
    from llmkd.infra.config import Config, DistillConfig

    curves = {"first": [0.10, 0.20, 0.25, 0.30, 0.31, 0.32], "behind": [0.01, 0.02, 0.03, 0.40, 0.5, 0.6],
              "ahead": [0.15, 0.25, 0.30, 0.35, 0.36, 0.37]}

    def fake_train(cfg, resume=False, on_epoch=None):
        curve, pruned = curves[cfg.distill.name], None
        for epoch, value in enumerate(curve, 1):
            if on_epoch(epoch, value):
                pruned = epoch
                break
        run = curve[: pruned or len(curve)]
        return {"best_valid_ndcg@10": max(run), "pruned_at_epoch": pruned, "epochs_run": len(run)}

    monkeypatch.setattr(distill, "train", fake_train)
    pruning = Pruning(str(tmp_path / "tune" / "pruning.journal"), min_epochs=2, reduction_factor=2)
    results = {}
    for name in curves:
        p = Pruning(pruning.journal, 2, 2) if jobs_share_the_journal else pruning
        results[name] = train_pruned(Config(out_dir=str(tmp_path), distill=DistillConfig(name=name)), p)
    assert results["first"]["pruned_at_epoch"] is None and results["first"]["epochs_run"] == 6
    assert results["behind"]["pruned_at_epoch"] == 2  # 0.02 against 0.20 at the first rung
    assert results["ahead"]["pruned_at_epoch"] is None and results["ahead"]["epochs_run"] == 6
    trials = pruning.open().get_trials()
    assert [(t.user_attrs["run"], t.state) for t in trials] == [
        ("first", TrialState.COMPLETE), ("behind", TrialState.PRUNED), ("ahead", TrialState.COMPLETE)]
    assert trials[2].value == 0.37


def test_the_search_never_chooses_a_pruned_candidate(run_dir):
    """A candidate marked pruned in its meta.json is reported with its status and valid NDCG@10 but is not
    chosen, even with the highest valid NDCG@10; the finished best is."""
    from test_recipe import CLEAR_GAIN, CONFIGURED_TWIN, FAMILIES_SMALL, FakeTrainer, fake_score

    from llmkd.distill.pruning import Pruning
    from llmkd.distill.recipe import run_search
    from llmkd.infra.config import load_config

    out, clock = run_dir
    cfg = load_config(None, [f"out_dir={out}"])
    trainer = FakeTrainer(clock)

    def train_fn(cfgs, jobs):
        trainer(cfgs, jobs)
        for c in cfgs:
            if c.student.content_hidden == 32:  # the best by fake_score: as if the pruner had stopped it
                path = Path(c.out_dir) / c.distill.name / "meta.json"
                meta = json.loads(path.read_text())
                meta.update({"pruned_at_epoch": 2, "best_valid_ndcg@10": fake_score(c) + 1})
                path.write_text(json.dumps(meta))

    report = run_search(cfg, {"content_features": FAMILIES_SMALL["content_features"]}, train_fn=train_fn,
                        gain_fn=CLEAR_GAIN, twins=CONFIGURED_TWIN, pruning=Pruning(str(out / "tune" / "pruning.journal")))
    by_name = {c["name"]: c for c in report["candidates"]}
    pruned = by_name["content_features_content_hidden=32"]
    assert pruned["status"] == "pruned at epoch 2" and pruned["valid_ndcg@10"] > by_name[report["chosen"]]["valid_ndcg@10"]
    assert report["chosen"] == "content_features_content_hidden=0"
    assert report["pruning"] == {"min_epochs": 5, "reduction_factor": 3}
    assert "pruned at epoch 2" in (out / "tune" / "report.md").read_text()


def test_a_pruned_twin_stage_trains_for_real_in_two_worker_processes(tmp_path, synthetic):
    """The search's twin stage (no teacher needed) with real training, `jobs` 2 (spawned workers sharing the
    journal): every trained candidate is one trial of the study, its state agrees with its meta.json, and
    the chosen twin was not pruned."""
    from optuna.trial import TrialState

    from llmkd.data import build_data, save_data
    from llmkd.distill.pruning import Pruning
    from llmkd.distill.recipe import run_search, twin_points

    cfg = tiny(tmp_path, synthetic, "unused", epochs=3)
    save_data(build_data(cfg.data), tmp_path / "data", cfg.data)
    pruning = Pruning(str(tmp_path / "tune" / "pruning.journal"), min_epochs=1, reduction_factor=2)
    points = dict(list(twin_points(cfg).items())[:3])  # as configured, half and twice the learning rate
    report = run_search(cfg, {}, jobs=2, pruning=pruning, twins=points)
    trials = {t.user_attrs["run"]: t for t in pruning.open().get_trials()}
    cands = [c for c in report["candidates"] if c["status"] != "reused"]
    assert len(cands) == len(trials) == 3
    for c in cands:
        trial = trials[c["folder"]]
        meta = json.loads((tmp_path / c["folder"] / "meta.json").read_text())
        assert (trial.state == TrialState.PRUNED) == bool(meta.get("pruned_at_epoch")), c["name"]
        assert trial.state in (TrialState.PRUNED, TrialState.COMPLETE), c["name"]
    chosen = next(c for c in cands if c["name"] == report["chosen"])
    assert trials[chosen["folder"]].state == TrialState.COMPLETE


@pytest.mark.parametrize("flag", [True, False])
def test_benchmark_kd_prune_flag_reaches_the_search(monkeypatch, tmp_path, flag):
    """`scripts/benchmark_kd.py --prune` hands the KD benchmark a Pruning whose journal is beside the search's
    runs; without the flag, none (every candidate to its early stop)."""
    from conftest import REPO, run_in_process

    from llmkd.experiments import kd_benchmark

    seen = {}

    def fake(cfg, seeds, families, search_seed, peer, jobs, budget, target, twins=None, pruning=None):
        seen["pruning"] = pruning
        return {"markdown": "", "folder": tmp_path}

    monkeypatch.setattr(kd_benchmark, "run_kd_benchmark", fake)
    args = ["--config", "configs/ml100k.yaml", "--set", f"out_dir={tmp_path}", "--families", "content_init"]
    proc = run_in_process(REPO / "scripts/benchmark_kd.py", args + (["--prune"] if flag else []))
    assert proc.returncode == 0, proc.stderr
    if flag:
        assert seen["pruning"].journal == str(tmp_path / "kd_benchmark" / "search" / "pruning.journal")
    else:
        assert seen["pruning"] is None


def test_the_kd_benchmarks_search_prunes_with_the_given_pruning(monkeypatch, tmp_path):
    from llmkd.distill.pruning import Pruning
    from llmkd.experiments import kd_benchmark
    from llmkd.infra.config import Config

    seen = {}

    def fake_search(cfg, families, budget_s, jobs, seed, folder, twins=None, pruning=None):
        seen.update(folder=folder, pruning=pruning)
        return {"candidates": []}

    monkeypatch.setattr(kd_benchmark, "run_search", fake_search)
    pruning = Pruning(str(tmp_path / "journal"))
    kd_benchmark.search(Config(out_dir=str(tmp_path)), {}, seed=0, pruning=pruning)
    assert seen == {"folder": "kd_benchmark/search", "pruning": pruning}


def test_a_reused_run_joins_the_study_with_its_curve_and_prunes_a_worse_candidate(tmp_path):
    """A finished run added from its meta.json history holds a later candidate to its curve: a candidate
    below it at the first rung is pruned (with the study empty it would go on, being the first); the run is
    added once, and a pruned or history-less run not at all."""
    from llmkd.distill.pruning import Pruning, add_finished

    def run(name: str, values: list[float], **meta) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        history = [{"epoch": e, "ndcg@10": v} for e, v in enumerate(values, start=1)]
        (folder / "meta.json").write_text(json.dumps({"history": history, "best_valid_ndcg@10": max(values), **meta}))
        return folder

    def pruned_at_first_rung(pruning: Pruning) -> bool:
        trial = pruning.open().ask()
        for epoch in range(1, 6):
            trial.report(0.05, epoch)
        return trial.should_prune()

    alone = Pruning(str(tmp_path / "alone.journal"), min_epochs=5, reduction_factor=3)
    assert not pruned_at_first_rung(alone)

    pruning = Pruning(str(tmp_path / "study.journal"), min_epochs=5, reduction_factor=3)
    good = run("good", [0.02 * e for e in range(1, 21)])  # 0.10 at epoch 5
    assert add_finished(pruning, good, "runs/good") and not add_finished(pruning, good, "runs/good")
    assert not add_finished(pruning, run("cut", [0.2] * 6, pruned_at_epoch=6), "runs/cut")
    assert not add_finished(pruning, run("none", [float("nan")]), "runs/none")
    trials = pruning.open().get_trials()
    assert len(trials) == 1 and trials[0].value == pytest.approx(0.4)
    assert trials[0].intermediate_values[5] == pytest.approx(0.1) and trials[0].intermediate_values[15] == pytest.approx(0.3)
    assert pruned_at_first_rung(pruning)


def test_a_pruned_search_adds_the_runs_it_reuses_to_the_study(run_dir):
    """A rerun of a pruned search reuses every finished candidate and puts each, with its curve, in the study
    (the trained ones are there already, under the same run names: not twice)."""
    from test_recipe import CLEAR_GAIN, CONFIGURED_TWIN, FAMILIES_SMALL, FakeTrainer

    from llmkd.distill.pruning import Pruning
    from llmkd.distill.recipe import run_search
    from llmkd.infra.config import load_config

    out, clock = run_dir
    cfg = load_config(None, [f"out_dir={out}"])
    trainer = FakeTrainer(clock)

    def train_fn(cfgs, jobs):  # the fake trainer's runs, with a curve in meta.json as distill.train writes it
        trainer(cfgs, jobs)
        for c in cfgs:
            path = Path(c.out_dir) / c.distill.name / "meta.json"
            meta = json.loads(path.read_text())
            meta["history"] = [{"epoch": e, "ndcg@10": meta["best_valid_ndcg@10"] * e / 3} for e in (1, 2, 3)]
            path.write_text(json.dumps(meta))

    families = {"content_features": FAMILIES_SMALL["content_features"]}
    first = Pruning(str(out / "first.journal"), min_epochs=1)
    run_search(cfg, families, train_fn=train_fn, gain_fn=CLEAR_GAIN, twins=CONFIGURED_TWIN, pruning=first)
    assert first.open().get_trials() == []  # the fake trainer does not report to the study
    again = Pruning(str(out / "again.journal"), min_epochs=1)
    report = run_search(cfg, families, train_fn=train_fn, gain_fn=CLEAR_GAIN, twins=CONFIGURED_TWIN, pruning=again)
    reused = sorted(c["folder"] for c in report["candidates"] if c.get("status") == "reused")
    trials = again.open().get_trials()
    assert reused and sorted(t.user_attrs["run"] for t in trials) == reused
    assert all(t.intermediate_values[1] == pytest.approx(t.value / 3) for t in trials)
    run_search(cfg, families, train_fn=train_fn, gain_fn=CLEAR_GAIN, twins=CONFIGURED_TWIN, pruning=again)
    assert len(again.open().get_trials()) == len(trials)
