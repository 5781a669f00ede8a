"""The seeds report's pieces: paired differences with their per-seed values, and a plot that stays readable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmkd.experiments.seeds import interval_cell, paired_difference, plot_seeds


def test_paired_difference_reports_each_seeds_difference_beside_the_user_interval():
    rng = np.random.default_rng(0)
    users = 400
    per_user = {name: {sd: {s: {"ndcg@10": rng.random(users) * 0.1 + shift + 0.01 * sd} for s in ("valid", "test")}
                       for sd in (0, 1, 2)} for name, shift in (("a", 0.05), ("b", 0.0))}
    per_user["a"][2]["test"]["ndcg@10"] = per_user["b"][2]["test"]["ndcg@10"] - 0.02  # seed 2 goes the other way
    p = paired_difference(per_user, "a", "b", [0, 1, 2], n=200)
    want = {sd: per_user["a"][sd]["test"]["ndcg@10"].mean() - per_user["b"][sd]["test"]["ndcg@10"].mean()
            for sd in (0, 1, 2)}
    assert p["test"]["per_seed"] == pytest.approx(want) and want[2] == pytest.approx(-0.02)
    assert p["test"]["mean"] == pytest.approx(np.mean(list(want.values())))
    assert p["test"]["lo"] < p["test"]["mean"] < p["test"]["hi"]
    assert interval_cell(p["test"]).endswith("seeds " + ", ".join(f"{want[sd]:+.4f}" for sd in (0, 1, 2)))


def test_the_plot_keeps_a_bar_height_per_system_whatever_the_names(tmp_path, monkeypatch):
    """Twenty systems with names as long as the Beauty benchmark's: the plotting area keeps at least 0.25 inch
    per system and most of the figure, and no label runs off the figure."""
    import matplotlib.figure

    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k)))
    long = "content_init_content_init=1.0+item_align_item_align=1.0+pairwise_hinge_alpha=1.0"
    names = ["popularity", "student_no_kd", *[f"{long}_{i}" for i in range(18)]]
    row = lambda m: {s: {"ndcg@10": {"mean": m, "std": 0.001}} for s in ("valid", "test")}  # noqa: E731
    rows = {n: {**row(0.05 + 0.001 * i), "per_seed": {0: {"test": {"ndcg@10": 0.05}}}} for i, n in enumerate(names)}
    plot_seeds(rows, tmp_path / "seeds.png")
    (fig,) = figures
    ax = fig.axes[0]
    height_in = ax.get_position().height * fig.get_figheight()
    assert height_in >= 0.25 * len(names) and ax.get_position().height >= 0.6
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure was closed after saving
    for label in ax.get_yticklabels():
        box = label.get_window_extent(renderer)
        assert box.x0 >= 0 and box.height < 0.5 * fig.dpi  # inside the figure, at most a few lines tall
    assert (tmp_path / "seeds.png").stat().st_size > 0


def test_compare_folders_reads_exported_and_checkpoint_students_alike(tmp_path, synthetic):
    """The same two runs given as exported folders and as their checkpoints' best/: identical rows, a paired
    difference of exactly 0 at each seed, and each run's progress (finished or not) reported."""
    from llmkd.data import build_data, save_data
    from llmkd.distill import train
    from llmkd.experiments.seeds import compare_folders
    from llmkd.infra.config import Config, DistillConfig, StudentConfig

    cfg = Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                 student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0))
    save_data(build_data(cfg.data), tmp_path / "data", cfg.data)
    for seed in (0, 1):
        cfg.distill = DistillConfig(name=f"s{seed}", alpha=0.0, epochs=2, batch_size=64, seed=seed)
        train(cfg)
    cfg.eval.bootstrap = 50
    reference = {"published": {"epochs": [0, 1, 2], "values": [0.0, 0.1, 0.2]}}
    result = compare_folders(cfg, {"exported": [tmp_path / "s0", tmp_path / "s1"],
                                   "best": [tmp_path / f"checkpoints/s{sd}/best" for sd in (0, 1)]}, tmp_path / "cmp",
                             reference)
    rows, p = result["rows"], result["paired"]["best - exported"]
    assert rows["best"]["test"] == rows["exported"]["test"] and rows["best"]["valid"] == rows["exported"]["valid"]
    assert p["test"]["per_seed"] == {0: 0.0, 1: 0.0} and p["test"]["lo"] == p["test"]["hi"] == 0.0
    runs = result["runs"]
    assert runs["exported seed 1"]["finished"] and not runs["best seed 1"]["finished"]
    assert runs["exported seed 1"]["best_epoch"] == runs["best seed 1"]["best_epoch"] >= 1
    assert (tmp_path / "cmp.json").is_file() and "stopped" in (tmp_path / "cmp.md").read_text()
    meta = json.loads((tmp_path / "s1" / "meta.json").read_text())
    curve = runs["best seed 1"]["valid_curve"]  # the train state's history is the exported run's history
    assert curve == runs["exported seed 1"]["valid_curve"] and curve["epochs"] == [1, 2]
    assert curve["values"] == [h["ndcg@10"] for h in meta["history"]]
    assert json.loads((tmp_path / "cmp.json").read_text())["references"] == reference
    assert (tmp_path / "cmp_curves.png").stat().st_size > 1000


def test_a_run_that_improves_while_it_is_compared_is_refused(tmp_path, synthetic, monkeypatch):
    """A checkpoint's best/ read while its run still trains: if the run records a better epoch before the
    comparison is done (best/ may then hold either epoch), the comparison stops with an error naming the
    folder instead of labelling one epoch's scores with another's number."""
    from llmkd.data import build_data, save_data
    from llmkd.distill import train
    from llmkd.experiments import seeds
    from llmkd.infra.artifacts import LlmkdError
    from llmkd.infra.config import Config, DistillConfig, StudentConfig

    cfg = Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                 student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0),
                 distill=DistillConfig(name="run", alpha=0.0, epochs=2, batch_size=64))
    save_data(build_data(cfg.data), tmp_path / "data", cfg.data)
    train(cfg)
    state = tmp_path / "checkpoints" / "run" / "last" / "train_state.json"
    real = seeds.evaluate_scores

    def meanwhile(*args, **kwargs):  # the training process finds a better epoch during the evaluation
        st = json.loads(state.read_text())
        st["best_epoch"] += 1
        state.write_text(json.dumps(st))
        return real(*args, **kwargs)

    monkeypatch.setattr(seeds, "evaluate_scores", meanwhile)
    with pytest.raises(LlmkdError, match="checkpoints/run/best.*better epoch while"):
        seeds.compare_folders(cfg, {"best": [tmp_path / "checkpoints" / "run" / "best"]}, tmp_path / "cmp")
