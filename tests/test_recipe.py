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

from llmkd.infra.artifacts import LlmkdError, write_json
from llmkd.infra.config import Config, DataConfig, load_config
from llmkd.data import save_data
from llmkd.infra.checkpoints import teacher_fingerprint
from llmkd.distill.recipe import FAMILIES, NO_TEACHER, best_by_family, combinations, first_candidates, run_search

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
    monkeypatch.setattr("llmkd.distill.recipe.time.monotonic", lambda: clock[0])
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
    from llmkd.distill.recipe import Candidate

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
    from llmkd.distill.recipe import twin_points

    out, clock = run_dir
    cfg = load_config(None, [f"out_dir={out}"])
    points = twin_points(cfg)
    assert points[""] == [] and points["lr=0.004"] == ["distill.lr=0.004"] and points["lr=0.001"] == ["distill.lr=0.001"]
    assert points["dropout=0.1"] == ["student.dropout=0.1"] and points["dropout=0.5"] == ["student.dropout=0.5"]
    assert points["init_std=0.1"] == ["student.init_std=0.1"] and len(points) == 6
    asked = []

    def gain(cfg, data, folder, base):
        asked.append(base.name)
        return {"mean": 0.01, "lo": 0.005, "hi": 0.015}

    trainer = FakeTrainer(clock)
    report = run_search(cfg, FAMILIES_SMALL, train_fn=trainer, gain_fn=gain)
    assert trainer.trained[:6] == [f"tune/runs/{NO_TEACHER}{n}_s0" for n in
                                   ("", "_lr=0.001", "_lr=0.004", "_dropout=0.1", "_dropout=0.5", "_init_std=0.1")]
    assert report["twin"] == f"{NO_TEACHER}_lr=0.004" and asked == [f"{NO_TEACHER}_lr=0.004_s0"]
    families = [c for c in report["candidates"] if c["family"] != NO_TEACHER]
    assert families and all(load_config(None, c["overrides"]).distill.lr == 0.004 for c in families)
    assert load_config(None, [f"out_dir={out}"], recipe=out / "tune" / "recipe.yaml").distill.lr == 0.004
    configured = run_search(cfg, FAMILIES_SMALL, train_fn=FakeTrainer(clock), gain_fn=gain, twins=CONFIGURED_TWIN,
                            folder="tune_configured")
    assert configured["twin"] == NO_TEACHER and all("distill.lr=0.004" not in c["overrides"]
                                                    for c in configured["candidates"])


BEST_SMALL = "content_features_content_hidden=32+user_align_user_align=1.0+listwise_kl_alpha=1.0"


def per_user_valid_ndcg(clear: bool, n: int = 40) -> dict[str, np.ndarray]:
    """Made-up per-user valid NDCG@10 of the valid best (`BEST_SMALL`) and of the no-teacher twin, by run
    folder: the best is 0.05 above the twin for every user (`clear`), or +0.30 / -0.26 on alternate users
    (a positive mean, +0.02, within a noise of +-0.28 per user)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 0.5, n)
    gain = 0.05 + rng.uniform(0.0, 0.01, n) if clear else np.where(np.arange(n) % 2 == 0, 0.30, -0.26)
    return {f"{BEST_SMALL}_s0": base + gain, f"{NO_TEACHER}_s0": base}


@pytest.mark.parametrize("clear", [True, False], ids=["interval_above_0", "interval_straddles_0"])
def test_the_paired_rule_on_real_bootstrap_intervals(run_dir, clear):
    """Both branches of the paired rule (`llmkd.distill.recipe.evidence`) through `run_search`, deterministically:
    the gain is the real `paired_bootstrap` of per-user valid NDCG@10 arrays looked up by the two run
    folders it is asked about (valid best first, twin second). An interval clearly above 0 keeps the valid
    best as the recipe; an interval that straddles 0 (with a positive mean, so a rule on the mean or on
    the upper end would keep the best) gives the no-teacher twin. The report records the interval."""
    from llmkd.evaluation.metrics import paired_bootstrap

    out, clock = run_dir
    cfg = load_config(None, [f"out_dir={out}"])
    arrays = per_user_valid_ndcg(clear)
    expected = paired_bootstrap(arrays[f"{BEST_SMALL}_s0"], arrays[f"{NO_TEACHER}_s0"])
    if clear:  # the premise of each case, on the real bootstrap's output
        assert expected["lo"] > 0.04
    else:
        assert expected["lo"] < -0.03 and expected["hi"] > 0.03 and expected["mean"] > 0
    asked = []

    def gain(cfg, data, folder, base):
        asked.append((folder.name, base.name))
        return paired_bootstrap(arrays[folder.name], arrays[base.name])

    report = run_search(cfg, FAMILIES_SMALL, train_fn=FakeTrainer(clock), gain_fn=gain, twins=CONFIGURED_TWIN)
    assert asked == [(f"{BEST_SMALL}_s0", f"{NO_TEACHER}_s0")]
    assert report["chosen"] == (BEST_SMALL if clear else NO_TEACHER)
    assert ("within noise" in report["why"]) == (not clear)
    assert f"[{expected['lo']:+.4f}, {expected['hi']:+.4f}]" in report["why"]
    best = next(c for c in report["candidates"] if c["name"] == BEST_SMALL)
    assert best["valid_gain"] == expected
    recipe = load_config(None, [f"out_dir={out}"], recipe=out / "tune" / "recipe.yaml")
    assert (recipe.student.content_features, recipe.distill.alpha) == ((True, 1.0) if clear else (False, 0.0))


def seal_test_split(monkeypatch) -> list[str]:
    """From now on every read of the test split raises and is recorded in the list returned (so a read
    whose error is swallowed is still seen): `RecData.targets('test')`, `RecData.history(u, 'test')`,
    `RecData.eval_users('test')` and the `test_item` array itself, except for `load_data`'s check that
    some user has a test item at all (`llmkd.data.no_eval_users`, which reads no item)."""
    import sys

    from llmkd.data import RecData, no_eval_users

    exempt, reads = no_eval_users.__code__, []

    def read(what: str) -> None:
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code is exempt:
                return
            frame = frame.f_back
        reads.append(what)
        raise AssertionError(f"the test split was read: {what}")

    def get_test_item(self):
        read("RecData.test_item")
        return self.__dict__["_sealed_test_item"]

    def set_test_item(self, value) -> None:
        self.__dict__["_sealed_test_item"] = value

    monkeypatch.setattr(RecData, "test_item", property(get_test_item, set_test_item), raising=False)

    def sealed(name: str):
        real = getattr(RecData, name)

        def guarded(self, *args, **kwargs):
            if kwargs.get("split", args[-1] if args else None) == "test":
                read(f"RecData.{name}(..., 'test')")
            return real(self, *args, **kwargs)

        return guarded

    for name in ("targets", "history", "eval_users"):
        monkeypatch.setattr(RecData, name, sealed(name))
    return reads


def test_the_search_never_reads_the_test_split(tmp_path, synthetic_data, monkeypatch):
    """A real search with the test split sealed (`seal_test_split`): two no-teacher points (the configured
    twin and dropout 0) trained by `llmkd.distill.train` (tiny, 1 epoch, in this process), then the real
    `valid_gain` (both students' per-user valid NDCG@10, paired bootstrap). The second point's recorded
    valid score is raised after training so it is the valid best and the paired rule is asked. The search
    completes without one read of test, and the gain it recorded is the two students' valid difference."""
    from llmkd.data import load_data
    from llmkd.distill.recipe import NO_TEACHER_OVERRIDES, train_many

    # not `run_dir`: its fake clock replaces time.monotonic everywhere, which the real training's lock reads
    save_data(synthetic_data, tmp_path / "data", DataConfig())
    assert len(load_data(tmp_path / "data").eval_users("test"))  # before the seal: there is a test split
    cfg = load_config(None, [f"out_dir={tmp_path}", "data.max_history=8", "student.dim=8", "student.num_layers=1",
                             "student.num_heads=1", "distill.epochs=1", "distill.batch_size=64"])
    families = {"plain": (list(NO_TEACHER_OVERRIDES), {"student.dropout": [0.0]})}
    trained = {}

    def train_fn(cfgs: list[Config], jobs: int) -> None:
        train_many(cfgs, jobs)  # jobs 1: in this process, under the seal
        for c in cfgs:
            meta_file = tmp_path / c.distill.name / "meta.json"
            meta = json.loads(meta_file.read_text())
            trained[c.distill.name] = meta["best_valid_ndcg@10"]
            if "plain" in c.distill.name:
                meta["best_valid_ndcg@10"] = 1.0
                write_json(meta_file, meta)

    reads = seal_test_split(monkeypatch)
    report = run_search(cfg, families, train_fn=train_fn, twins=CONFIGURED_TWIN)
    assert reads == []
    assert sorted(trained) == ["tune/runs/no_teacher_s0", "tune/runs/plain_dropout=0.0_s0"]
    best = next(c for c in report["candidates"] if c["name"] == "plain_dropout=0.0")
    assert best["valid_gain"]["mean"] == pytest.approx(
        trained["tune/runs/plain_dropout=0.0_s0"] - trained["tune/runs/no_teacher_s0"], abs=1e-5)
    assert report["chosen"] == ("plain_dropout=0.0" if best["valid_gain"]["lo"] > 0 else NO_TEACHER)
