"""Recipe search: candidate order, combinations, budget, reuse, and the recipe file distill reads.

Training is replaced by a fake that writes a finished student's meta.json with a valid NDCG@10 chosen
by the test, so the search logic is checked exactly and fast; tests/test_end_to_end.py runs the real
`scripts/tune.py` and `scripts/distill.py --recipe`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from llmkd.artifacts import LlmkdError, write_json
from llmkd.config import Config, DataConfig, load_config
from llmkd.data import save_data
from llmkd.checkpoints import teacher_fingerprint
from llmkd.recipe import FAMILIES, NO_TEACHER, best_by_family, combinations, first_candidates, run_search

CONFIGURED_TWIN = {"": []}  # the twin stage as it was: the configured no-teacher student only
CLEAR_GAIN = lambda cfg, data, folder, base: {"mean": 0.01, "lo": 0.005, "hi": 0.015}  # noqa: E731 (beyond noise)
FAMILIES_SMALL = {
    "content_features": (["distill.alpha=0", "student.content_features=true"], {"student.content_hidden": [0, 32]}),
    "user_align": (["distill.alpha=0"], {"distill.user_align": [1.0]}),
    "listwise_kl": (["distill.kd_loss=listwise_kl"], {"distill.alpha": [0.1, 1.0]}),
    "margin_mse": (["distill.kd_loss=margin_mse"], {"distill.alpha": [0.01]}),
}


def fake_score(cfg: Config) -> float:
    """A made-up valid NDCG@10: content helps, 256-wide content more, listwise KL at alpha 1 helps most of
    the score losses, user_align a little; effects add up."""
    s, d = cfg.student, cfg.distill
    v = 0.10 + 0.01 * (d.lr == 0.004) + 0.02 * s.content_features + 0.005 * (s.content_hidden == 32) + 0.003 * (d.user_align > 0)
    if d.alpha > 0:
        v += {"listwise_kl": 0.004 * d.alpha, "margin_mse": -0.01}[d.kd_loss]
    return round(v, 6)


class FakeTrainer:
    """Writes what `llmkd.distill.train` would leave behind for `reuse` and the search: meta.json, and
    weights and config files that load (a student whose files do not load is never reused)."""

    def __init__(self, clock: list[float], seconds: float = 10.0) -> None:
        self.clock, self.seconds, self.trained = clock, seconds, []

    def __call__(self, cfgs: list[Config], jobs: int) -> None:
        for cfg in cfgs:
            folder = Path(cfg.out_dir) / cfg.distill.name
            folder.mkdir(parents=True)
            teacher = Path(cfg.out_dir) / cfg.distill.teacher
            write_json(folder / "meta.json", {"stage": "student", "config": cfg.to_dict(),
                                              "data_fingerprint": json.loads((Path(cfg.out_dir) / "data" / "meta.json")
                                                                             .read_text())["data_fingerprint"],
                                              "teacher_fingerprint": teacher_fingerprint(teacher),
                                              "best_valid_ndcg@10": fake_score(cfg), "best_epoch": 3})
            write_json(folder / "config.json", {})
            save_file({"w": np.zeros(1, dtype=np.float32)}, str(folder / "model.safetensors"))
            self.trained.append(cfg.distill.name)
        self.clock[0] += self.seconds * -(-len(cfgs) // jobs)  # batches of `jobs` run side by side


@pytest.fixture
def run_dir(tmp_path, synthetic_data, monkeypatch):
    """out_dir with a data artifact and a stand-in teacher cache; the search's clock is fake."""
    save_data(synthetic_data, tmp_path / "data", DataConfig())
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "meta.json").write_text('{"stage": "teacher"}\n')
    clock = [0.0]
    monkeypatch.setattr("llmkd.recipe.time.monotonic", lambda: clock[0])
    return tmp_path, clock


def test_candidates_breadth_first_with_no_teacher_first():
    cands = first_candidates(FAMILIES_SMALL)
    assert [c.name for c in cands] == [
        NO_TEACHER, "content_features_content_hidden=0", "user_align_user_align=1.0", "listwise_kl_alpha=0.1",
        "margin_mse_alpha=0.01", "content_features_content_hidden=32", "listwise_kl_alpha=1.0"]
    assert cands[3].overrides == ["distill.kd_loss=listwise_kl", "distill.alpha=0.1"]
    names = [c.name for c in first_candidates(FAMILIES)]
    assert len(names) == len(set(names)) == 1 + sum(len(v) for _, grid in FAMILIES.values() for v in grid.values())


def test_combinations_keep_the_score_loss_alpha(run_dir):
    out, _ = run_dir
    cands = first_candidates(FAMILIES_SMALL)
    for c in cands:
        c.record["valid_ndcg@10"] = fake_score(load_config(None, c.overrides))
    combos = {c.name: c for c in combinations(best_by_family(cands))}
    assert set(combos) == {"content_features_content_hidden=32+listwise_kl_alpha=1.0",
                           "content_features_content_hidden=32+user_align_user_align=1.0",
                           "content_features_content_hidden=32+user_align_user_align=1.0+listwise_kl_alpha=1.0"}
    cfg = load_config(None, combos["content_features_content_hidden=32+user_align_user_align=1.0+listwise_kl_alpha=1.0"]
                      .overrides)
    assert (cfg.student.content_features, cfg.student.content_hidden) == (True, 32)
    assert (cfg.distill.kd_loss, cfg.distill.alpha, cfg.distill.user_align) == ("listwise_kl", 1.0, 1.0)


def test_both_content_families_are_combined_when_both_ran():
    from llmkd.recipe import Candidate

    def cand(name, family, overrides, score):
        c = Candidate(name, family, overrides, 0)
        c.record["valid_ndcg@10"] = score
        return c

    best = {"content_init": cand("ci", "content_init", ["distill.alpha=0", "student.content_init=1.0"], 0.07),
            "content_features": cand("cf", "content_features", ["distill.alpha=0", "student.content_features=true",
                                                                "student.content_hidden=0"], 0.06)}
    combos = {c.name: c for c in combinations(best)}
    assert set(combos) == {"cf+ci"}
    cfg = load_config(None, combos["cf+ci"].overrides)
    assert (cfg.student.content_features, cfg.student.content_init, cfg.distill.alpha) == (True, 1.0, 0.0)
    assert {c.name for c in combinations({"content_init": best["content_init"]})} == set()


def test_search_chooses_the_valid_best_and_writes_a_recipe_distill_reads(run_dir):
    out, clock = run_dir
    cfg = load_config(None, [f"out_dir={out}"])
    trainer = FakeTrainer(clock)
    report = run_search(cfg, FAMILIES_SMALL, train_fn=trainer, gain_fn=CLEAR_GAIN, twins=CONFIGURED_TWIN)
    scores = {c["name"]: c["valid_ndcg@10"] for c in report["candidates"]}
    assert len(scores) == 7 + 3 and all(c["status"] == "trained" for c in report["candidates"])
    assert report["chosen"] == max(scores, key=scores.get)
    assert report["chosen"] == "content_features_content_hidden=32+user_align_user_align=1.0+listwise_kl_alpha=1.0"
    recipe = out / "tune" / "recipe.yaml"
    chosen = load_config(None, [f"out_dir={out}"], recipe=recipe)
    assert fake_score(chosen) == scores[report["chosen"]]
    assert (out / "tune" / "report.md").read_text().count("**") >= 2 and (out / "tune" / "search.png").is_file()
    # a rerun trains nothing: every run is reused
    again = run_search(cfg, FAMILIES_SMALL, train_fn=FakeTrainer(clock), gain_fn=CLEAR_GAIN, twins=CONFIGURED_TWIN)
    assert {c["status"] for c in again["candidates"]} == {"reused"} and again["chosen"] == report["chosen"]


def test_budget_stops_new_runs_and_says_so(run_dir):
    out, clock = run_dir
    cfg = load_config(None, [f"out_dir={out}"])
    trainer = FakeTrainer(clock, seconds=10.0)
    report = run_search(cfg, FAMILIES_SMALL, budget_s=35.0, train_fn=trainer, gain_fn=CLEAR_GAIN, twins=CONFIGURED_TWIN)
    status = {c["name"]: c["status"] for c in report["candidates"]}
    assert len(trainer.trained) == 3  # 0 + 10 <= 35, 10 + 10, 20 + 10; then 30 + 10 > 35
    assert [n for n, s in status.items() if s == "trained"] == [NO_TEACHER, "content_features_content_hidden=0",
                                                                 "user_align_user_align=1.0"]
    assert set(status.values()) == {"trained", "skipped: budget"}
    assert report["chosen"] == "content_features_content_hidden=0"
    assert "skipped: budget" in (out / "tune" / "report.md").read_text()
    # with more budget the next call continues where the first stopped, reusing what is done
    more = FakeTrainer(clock)
    run_search(cfg, FAMILIES_SMALL, budget_s=1000.0, train_fn=more, gain_fn=CLEAR_GAIN, twins=CONFIGURED_TWIN)
    assert NO_TEACHER + "_s0" not in " ".join(more.trained) and len(more.trained) == 10 - 3


def test_recipe_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("distill: [1, 2]\n")
    with pytest.raises(LlmkdError, match="recipe.yaml: a recipe is a mapping"):
        load_config(None, recipe=bad)
    bad.write_text(yaml.safe_dump({"distill": {"no_such_field": 1}}))
    with pytest.raises(LlmkdError, match="recipe.*no_such_field"):
        load_config(None, recipe=bad)
    with pytest.raises(LlmkdError, match="recipe file not found"):
        load_config(None, recipe=tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"distill": {"alpha": 0.3}}))
    assert load_config(None, ["distill.alpha=0.5"], recipe=good).distill.alpha == 0.5  # --set wins over the recipe
    assert load_config(None, recipe=good).distill.alpha == 0.3


def test_a_finished_student_in_out_dir_stands_for_its_candidate(run_dir):
    out, clock = run_dir
    cfg = load_config(None, [f"out_dir={out}"])
    FakeTrainer(clock)([load_config(None, [f"out_dir={out}", "distill.alpha=0", "distill.name=student_no_kd"])], 1)
    trainer = FakeTrainer(clock)
    report = run_search(cfg, {"user_align": FAMILIES_SMALL["user_align"]}, train_fn=trainer, gain_fn=CLEAR_GAIN, twins=CONFIGURED_TWIN)
    status = {c["name"]: c["status"] for c in report["candidates"]}
    assert status == {NO_TEACHER: "reused", "user_align_user_align=1.0": "trained"}
    assert trainer.trained == ["tune/runs/user_align_user_align=1.0_s0"]


@pytest.mark.parametrize("lo, chosen", [(0.001, "content_features_content_hidden=32+user_align_user_align=1.0+listwise_kl_alpha=1.0"),
                                        (-0.001, NO_TEACHER)])
def test_a_recipe_within_noise_of_no_teacher_is_not_chosen(run_dir, lo, chosen):
    """The best on valid is kept only when its paired-bootstrap interval over valid users is above 0;
    otherwise the recipe is the no-teacher student, and the report says why."""
    out, clock = run_dir
    cfg = load_config(None, [f"out_dir={out}"])
    asked = []

    def gain(cfg, data, folder, base):
        asked.append((folder.name, base.name))
        return {"mean": 0.002, "lo": lo, "hi": 0.004}

    report = run_search(cfg, FAMILIES_SMALL, train_fn=FakeTrainer(clock), gain_fn=gain, twins=CONFIGURED_TWIN)
    assert asked == [("content_features_content_hidden=32+user_align_user_align=1.0+listwise_kl_alpha=1.0_s0",
                      f"{NO_TEACHER}_s0")]
    assert report["chosen"] == chosen and ("within noise" in report["why"]) == (lo < 0)
    recipe = (Path(cfg.out_dir) / "tune" / "recipe.yaml").read_text()
    assert ("student.content_features" in recipe or "content_features: true" in recipe) == (lo > 0)


def test_the_twin_stage_picks_the_best_no_teacher_settings_and_every_family_trains_with_them(run_dir):
    """Twin points first; the valid best (here twice the lr) is the no-teacher baseline of the evidence rule
    and its settings ride along in every family candidate and in the recipe."""
    from llmkd.recipe import twin_points

    out, clock = run_dir
    cfg = load_config(None, [f"out_dir={out}"])
    points = twin_points(cfg)
    assert points[""] == [] and points["lr=0.004"] == ["distill.lr=0.004"] and points["lr=0.001"] == ["distill.lr=0.001"]
    assert points["dropout=0.6"] == ["student.dropout=0.6"] and points["init_std=0.1"] == ["student.init_std=0.1"]
    asked = []

    def gain(cfg, data, folder, base):
        asked.append(base.name)
        return {"mean": 0.01, "lo": 0.005, "hi": 0.015}

    trainer = FakeTrainer(clock)
    report = run_search(cfg, FAMILIES_SMALL, train_fn=trainer, gain_fn=gain)
    assert trainer.trained[:5] == [f"tune/runs/{NO_TEACHER}{n}_s0" for n in
                                   ("", "_lr=0.001", "_lr=0.004", "_dropout=0.6", "_init_std=0.1")]
    assert report["twin"] == f"{NO_TEACHER}_lr=0.004" and asked == [f"{NO_TEACHER}_lr=0.004_s0"]
    families = [c for c in report["candidates"] if c["family"] != NO_TEACHER]
    assert families and all(load_config(None, c["overrides"]).distill.lr == 0.004 for c in families)
    assert load_config(None, [f"out_dir={out}"], recipe=out / "tune" / "recipe.yaml").distill.lr == 0.004
    configured = run_search(cfg, FAMILIES_SMALL, train_fn=FakeTrainer(clock), gain_fn=gain, twins=CONFIGURED_TWIN,
                            folder="tune_configured")
    assert configured["twin"] == NO_TEACHER and all("distill.lr=0.004" not in c["overrides"]
                                                    for c in configured["candidates"])
