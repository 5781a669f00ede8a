"""Recipe search: which distillation works on this dataset, chosen on valid under a wall-clock budget.

The candidates are the distillation families (the teacher's item-text vectors as content features,
each score-KD loss, user / item alignment heads), each over a small grid, plus their combinations
(content + one score loss, content + one alignment, content + score loss + alignment, each family at
its own chosen point), and the student without a teacher. Every candidate is one early-stopped
student run at one seed, selected on valid NDCG@10; test is never read here. The valid best becomes the
recipe only when its per-user valid gain over the no-teacher run is beyond noise (`evidence`).

Search order (so a short budget spends itself where it pays most):
  twin stage: the no-teacher student at its configured settings and at a few others (`twin_points`: lr,
    dropout, init scale); the valid best is the twin, and its settings train every candidate after it;
  round 0: the first grid point of every family;
  round 1, 2, ...: the remaining grid points, breadth-first over families;
  last: the combinations, built from each family's best point so far.
A run starts only while `elapsed + (mean fresh run time) <= budget`; finished runs are reused (keyed on
their training inputs, `llmkd.infra.reuse`; students already in out_dir, like `student_no_kd`, count too), an
interrupted run resumes from its checkpoint. With `pruning` (`llmkd.distill.pruning`, `scripts/tune.py --prune`)
a candidate that falls behind the ones before it at a rung of epochs is stopped there and never chosen.

Writes `<out_dir>/<folder>/`: recipe.yaml (the chosen overrides as a config fragment that
`scripts/distill.py --recipe` reads), report.json, report.md and search.png. Runs land in
`<out_dir>/<folder>/runs/<candidate>_s<seed>/`.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from llmkd.data import load_data
from llmkd.distill import train
from llmkd.distill.pruning import Pruning, add_finished, train_pruned
from llmkd.infra.artifacts import LlmkdError, atomic_dir, write_json
from llmkd.infra.config import Config, apply_overrides, from_dict
from llmkd.infra.locks import locked
from llmkd.infra.reuse import reuse

NO_TEACHER = "no_teacher"
# The twin without a teacher: no KD term, no alignment head, no teacher item features, whatever the base
# config (or a recipe laid over it) says.
NO_TEACHER_OVERRIDES = ["distill.alpha=0", "distill.user_align=0", "distill.item_align=0",
                        "student.content_features=false"]
SCORE_KD = ("listwise_kl", "ranking_distillation", "relaxed_ranking", "margin_mse", "pairwise_hinge", "infonce")
ALIGN = ("user_align", "item_align")
CONTENT = ("content_features", "content_init")  # the teacher's item-text vectors as features / as initial ids

# family -> (fixed overrides, grid searched on valid); alpha weighs a score-KD loss against the hard loss.
# Order = search priority: on both measured datasets content features were the strongest family.
FAMILIES: dict[str, tuple[list[str], dict[str, list]]] = {
    # embedding distillation: the teacher's item-text vectors through a learned projection into the item tower
    "content_features": (["distill.alpha=0", "student.content_features=true"], {"student.content_hidden": [0, 256]}),
    # the id embeddings start from the principal components of the teacher's item vectors (std 0.02 = the
    # random init's scale, ~0.1 = a trained embedding's); nothing of the teacher is kept for serving
    "content_init": (["distill.alpha=0"], {"student.content_init": [0.02, 0.1, 0.3, 1.0, 3.0]}),
    # multi-task: the student's user state, through a head, predicts the teacher's user vector
    "user_align": (["distill.alpha=0"], {"distill.user_align": [1.0, 0.3, 3.0]}),
    # embedding alignment: the student's item vectors, through a head, match the teacher's
    "item_align": (["distill.alpha=0"], {"distill.item_align": [0.1, 1.0]}),
    **{name: ([f"distill.kd_loss={name}"], {"distill.alpha": [0.1, 1.0]}) for name in SCORE_KD},
    # squared margins of scores scaled by teacher_scale (20) run ~10-100x the other losses: smaller weights
    "margin_mse": (["distill.kd_loss=margin_mse"], {"distill.alpha": [0.01, 0.1]}),
    # a sum of K=10 Plackett-Luce log-likelihood terms per row (~10x a listwise loss): smaller weights too
    "relaxed_ranking": (["distill.kd_loss=relaxed_ranking"], {"distill.alpha": [0.01, 0.1, 1.0]}),
}


@dataclass
class Candidate:
    """One student run of the search."""

    name: str
    family: str
    overrides: list[str]
    round: int
    record: dict = field(default_factory=dict)
    """After the search: status ('trained', 'reused', 'skipped: budget'), valid NDCG@10, best epoch, seconds."""


def point_name(family: str, point: list[str]) -> str:
    """A run's name from its family and grid point, e.g. 'listwise_kl_alpha=0.1' (stable as grids grow)."""
    return "_".join([family, *(o.partition("=")[0].split(".")[-1] + "=" + o.partition("=")[2] for o in point)])


def first_candidates(families: dict[str, tuple[list[str], dict[str, list]]], twin: list[str] | None = None
                     ) -> list[Candidate]:
    """The no-teacher student and every family's grid points, ordered breadth-first (see module doc).
    `twin`: the chosen twin point's settings, appended to every family candidate (and the no-teacher
    candidate then left out: the twin stage ran it)."""
    out = [] if twin is not None else [Candidate(NO_TEACHER, NO_TEACHER, list(NO_TEACHER_OVERRIDES), 0)]
    for family, (fixed, grid) in families.items():
        if len(grid) > 1:
            raise LlmkdError(f"recipe family {family}: one searched key per family, got {sorted(grid)}")
        for i, (key, value) in enumerate((k, v) for k, vs in grid.items() for v in vs):
            point = [f"{key}={value}"]
            out.append(Candidate(point_name(family, point), family, [*fixed, *point, *(twin or [])], i))
        if not grid:
            out.append(Candidate(family, family, [*fixed, *(twin or [])], 0))
    return sorted(out, key=lambda c: c.round)  # stable: family order within a round


def twin_points(cfg: Config) -> dict[str, list[str]]:
    """The no-teacher twin's training settings the search tries, one change at a time from `cfg`'s (name ->
    overrides; '' = as configured): half and twice the learning rate, dropout 0.2 lower and higher (within
    [0, 0.9)), ids initialised at 5x the random scale. The best on valid trains every family, so a teacher
    is measured over the strongest twin the same search can train, and an effect of lr, dropout or init
    scale is never credited to the teacher."""
    d, s = cfg.distill, cfg.student
    points = {"": [], f"lr={d.lr / 2:g}": [f"distill.lr={d.lr / 2:g}"], f"lr={d.lr * 2:g}": [f"distill.lr={d.lr * 2:g}"]}
    for dropout in (round(s.dropout - 0.2, 4), round(s.dropout + 0.2, 4)):
        if 0 <= dropout < 0.9:
            points[f"dropout={dropout:g}"] = [f"student.dropout={dropout:g}"]
    points[f"init_std={s.init_std * 5:g}"] = [f"student.init_std={s.init_std * 5:g}"]
    return points


def twin_candidates(points: dict[str, list[str]]) -> list[Candidate]:
    """One no-teacher candidate per twin point: `no_teacher` for the configured settings, `no_teacher_<point>`."""
    return [Candidate("_".join(filter(None, [NO_TEACHER, name])), NO_TEACHER, [*NO_TEACHER_OVERRIDES, *overrides], 0)
            for name, overrides in points.items()]


def best_by_family(cands: list[Candidate]) -> dict[str, Candidate]:
    """The finished candidate (run to its early stop, not pruned) with the highest valid NDCG@10 in each family."""
    best: dict[str, Candidate] = {}
    for c in cands:
        v = None if c.record.get("pruned_at_epoch") else c.record.get("valid_ndcg@10")
        if v is not None and (c.family not in best or v > best[c.family].record["valid_ndcg@10"]):
            best[c.family] = c
    return best


def combinations(best: dict[str, Candidate]) -> list[Candidate]:
    """The best content family + the best score loss, + the best alignment, and all three (each at its best
    point); and both content families together (ids initialised from the teacher's item vectors and those
    vectors as features), when both were run.

    Overrides are concatenated content, alignment, score loss: the score loss's alpha comes last, so the
    `distill.alpha=0` of the other families does not switch it off."""
    def top(names: tuple[str, ...]) -> Candidate | None:
        found = [best[n] for n in names if n in best]
        return max(found, key=lambda c: c.record["valid_ndcg@10"]) if found else None

    content, score, align = top(CONTENT), top(SCORE_KD), top(ALIGN)
    if content is None:
        return []
    out = []
    both = [best[n] for n in CONTENT if n in best]  # content_features, content_init: their overrides do not clash
    for parts in ([content, score], [content, align], [content, align, score], *([both] if len(both) == 2 else [])):
        if all(p is not None for p in parts):
            name = "+".join(p.name for p in parts)
            out.append(Candidate(name, "combination", [o for p in parts for o in p.overrides], 99))
    return out


def candidate_config(cfg: Config, cand: Candidate, seed: int, folder: str) -> Config:
    """`cfg` with the candidate's overrides, `seed`, and its run folder `<folder>/runs/<name>_s<seed>`."""
    raw = apply_overrides(copy.deepcopy(cfg.to_dict()), [*cand.overrides, f"distill.seed={seed}",
                                                         f"distill.name={folder}/runs/{cand.name}_s{seed}"])
    return from_dict(Config, raw)


def recipe_fragment(overrides: list[str]) -> dict:
    """Overrides 'a.b=v' -> the nested config fragment {'a': {'b': v}} (later overrides win)."""
    return apply_overrides({}, overrides)


def valid_gain(cfg: Config, data, folder: Path, base: Path) -> dict[str, float]:
    """Per-user valid NDCG@10 of the student in `folder` minus the no-teacher student's in `base`: the mean
    and its 95 % paired-bootstrap interval over valid users."""
    from llmkd.evaluation.metrics import evaluate_scores, paired_bootstrap
    from llmkd.evaluation.report import load_student, student_scorer

    per_user = [evaluate_scores(data, "valid", student_scorer(load_student(f, data, Path(cfg.out_dir)), data),
                                ks=(10,), name=str(f))["ndcg@10"] for f in (folder, base)]
    return paired_bootstrap(per_user[0], per_user[1])


@locked(lambda a: Path(a["cfg"].out_dir) / a["folder"])
def run_search(cfg: Config, families: dict | None = None, budget_s: float | None = None, jobs: int = 1,
               seed: int | None = None, folder: str = "tune", train_fn=None, gain_fn=valid_gain,
               twins: dict[str, list[str]] | None = None, pruning: Pruning | None = None) -> dict:
    """Search the candidates on valid within `budget_s` seconds (None = no limit); write the report and
    `recipe.yaml` to `<out_dir>/<folder>/`. First the twin's points (`twins`, default `twin_points(cfg)`;
    {'': []} = the configured twin only), then every family with the best twin's settings, then the
    combinations. `train_fn(cfgs, jobs)` trains students (default `train_many` with resume and `pruning`);
    tests can swap it."""
    if train_fn is None:
        def train_fn(cfgs: list[Config], jobs: int) -> None:
            train_many(cfgs, jobs, resume=True, pruning=pruning)

    families = FAMILIES if families is None else families
    seed = cfg.distill.seed if seed is None else seed
    out = Path(cfg.out_dir)
    data = load_data(out / "data")
    twins = twin_candidates(twin_points(cfg) if twins is None else twins)
    finished = sorted(p.parent for p in out.glob("*/meta.json"))  # e.g. student_no_kd stands for no_teacher
    start, fresh = time.monotonic(), []  # wall seconds of each batch of fresh runs
    cands = list(twins)
    bar = tqdm(total=len(twins) + len(first_candidates(families, twin=[])) + 3, desc="recipe search", unit="run")

    def record(c: Candidate, vcfg: Config, status: str, **extra) -> None:
        meta = json.loads((out / vcfg.distill.name / "meta.json").read_text(encoding="utf-8"))
        if meta.get("pruned_at_epoch"):
            status, extra = f"pruned at epoch {meta['pruned_at_epoch']}", {**extra, "pruned_at_epoch": meta["pruned_at_epoch"]}
        c.record.update(status=status, **extra, folder=vcfg.distill.name, best_epoch=meta["best_epoch"])
        c.record["valid_ndcg@10"] = meta["best_valid_ndcg@10"]
        best = max(x.record.get("valid_ndcg@10", -1.0) for x in cands)
        bar.update(1)
        bar.set_postfix(best=f"{best:.4f}", elapsed=f"{time.monotonic() - start:.0f}s")

    def run_all(todo: list[Candidate]) -> None:
        """Reuse what is done; train the rest `jobs` at a time while the budget lasts."""
        pending = []
        for c in todo:
            vcfg = candidate_config(cfg, c, seed, folder)
            if reuse(vcfg, data.fingerprint, finished, data.num_items, pruned_ok=pruning is not None):
                if pruning is not None:
                    add_finished(pruning, out / vcfg.distill.name, vcfg.distill.name)
                record(c, vcfg, "reused")
            else:
                pending.append((c, vcfg))
        for i in range(0, len(pending), jobs):
            batch = pending[i : i + jobs]
            expected = sum(fresh) / len(fresh) if fresh else 0.0
            if budget_s is not None and time.monotonic() - start + expected > budget_s:
                for c, _ in batch:
                    c.record["status"] = "skipped: budget"
                    bar.update(1)
                continue
            t0 = time.monotonic()
            train_fn([vcfg for _, vcfg in batch], jobs)
            fresh.append(time.monotonic() - t0)
            for c, vcfg in batch:
                record(c, vcfg, "trained", seconds=round(fresh[-1], 1))

    run_all(twins)
    twin = best_by_family(twins).get(NO_TEACHER, twins[0])  # the first (configured) point if none finished
    settings = twin.overrides[len(NO_TEACHER_OVERRIDES):]
    cands += first_candidates(families, twin=settings)
    run_all(cands[len(twins):])
    combos = combinations(best_by_family(cands))
    bar.total = len(cands) + len(combos)
    bar.refresh()
    run_all(combos)
    bar.close()
    cands += combos
    finished = [c for c in cands if "valid_ndcg@10" in c.record and not c.record.get("pruned_at_epoch")]
    if not finished:
        raise LlmkdError(f"recipe search: no run finished within the budget of {budget_s} s; raise --budget")
    chosen, why = evidence(max(finished, key=lambda c: c.record["valid_ndcg@10"]),  # first on ties
                           twin if "valid_ndcg@10" in twin.record else None,
                           lambda c, base: gain_fn(cfg, data, out / c.record["folder"], out / base.record["folder"]))
    report = {"seed": seed, "budget_s": budget_s, "elapsed_s": round(time.monotonic() - start, 1),
              "pruning": None if pruning is None else {"min_epochs": pruning.min_epochs,
                                                       "reduction_factor": pruning.reduction_factor},
              "data_fingerprint": data.fingerprint, "chosen": chosen.name, "chosen_overrides": chosen.overrides,
              "twin": twin.name, "twin_overrides": twin.overrides,
              "why": why,
              "candidates": [{"name": c.name, "family": c.family, "overrides": c.overrides, **c.record} for c in cands]}
    write_report(out / folder, report, cands, chosen)
    return report


def evidence(best: Candidate, no_teacher: Candidate | None, gain) -> tuple[Candidate, str]:
    """The recipe to use: the best on valid if its per-user valid gain over the no-teacher run is beyond
    noise (the 95 % paired-bootstrap interval of `gain(best, no_teacher)` is above 0), else the no-teacher
    run: a teacher is worth its cost only when valid says so clearly (on ml-100k's 943 users a +1.4 %
    valid pick at one seed came out 4 % below the no-teacher twin on test)."""
    if no_teacher is None or best is no_teacher:
        return best, "the best on valid"
    g = best.record["valid_gain"] = gain(best, no_teacher)
    interval = f"valid NDCG@10 {g['mean']:+.4f} over no teacher, 95 % interval [{g['lo']:+.4f}, {g['hi']:+.4f}]"
    if g["lo"] > 0:
        return best, f"the best on valid: {interval}"
    return no_teacher, f"{best.name} was best on valid but within noise ({interval}); no teacher"


def write_report(folder: Path, report: dict, cands: list[Candidate], chosen: Candidate) -> None:
    """recipe.yaml, report.json, report.md and search.png, written atomically (reusing `runs/`)."""
    base = next((c.record.get("valid_ndcg@10") for c in cands if c.name == report["twin"]), None)
    md = [f"Recipe search on valid (seed {report['seed']}, {report['elapsed_s']:.0f} s, budget "
          f"{report['budget_s'] or 'none'}): chosen **{chosen.name}**: {report['why']}.", "",
          "| candidate | overrides | status | valid NDCG@10 | vs no teacher | best epoch |",
          "|---|---|---|---|---|---|"]
    for c in cands:
        v = c.record.get("valid_ndcg@10")
        rel = f"{v / base:.3f}x" if v is not None and base else ""
        cells = [c.name, ", ".join(c.overrides), c.record.get("status", ""), f"{v:.4f}" if v is not None else "", rel,
                 str(c.record.get("best_epoch", ""))]
        if c is chosen:
            cells = [f"**{x}**" if x else x for x in cells]
        md.append("| " + " | ".join(cells) + " |")
    header = (f"# Distillation recipe chosen on valid by the recipe search (llmkd.distill.recipe): {chosen.name}\n"
              f"# valid NDCG@10 {chosen.record['valid_ndcg@10']:.4f}"
              + (f" vs {base:.4f} without a teacher" if base is not None else "")
              + f"; data fingerprint {report['data_fingerprint']}\n"
              "# use: scripts/distill.py --config ... --recipe <this file>\n")
    tmp_parent = folder.parent / f".{folder.name}.report"
    with atomic_dir(tmp_parent) as tmp:
        (tmp / "recipe.yaml").write_text(header + yaml.safe_dump(recipe_fragment(chosen.overrides), sort_keys=True),
                                         encoding="utf-8")
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
        plot_search(cands, base, tmp / "search.png")
    folder.mkdir(parents=True, exist_ok=True)
    for f in tmp_parent.iterdir():  # each file replaced by a rename: readers never see half a file
        f.replace(folder / f.name)
    tmp_parent.rmdir()


def plot_search(cands: list[Candidate], base: float | None, path: Path) -> None:
    """Horizontal bars: valid NDCG@10 of every finished candidate, the no-teacher run as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in cands if "valid_ndcg@10" in c.record]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(done) + 1.5))
    ax.barh(range(len(done)), [c.record["valid_ndcg@10"] for c in done], alpha=0.7)
    ax.set_yticks(range(len(done)), [c.name + (" (pruned)" if c.record.get("pruned_at_epoch") else "") for c in done],
                  fontsize=7)
    if base is not None:
        ax.axvline(base, color="k", ls="--", lw=1, label="no teacher (the chosen twin)")
        ax.legend(loc="lower right")
    ax.invert_yaxis()
    ax.set_xlabel("valid NDCG@10")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_one(cfg: Config, resume: bool, pruning: Pruning | None, threads: int | None = None) -> None:
    """One student: `distill.train`, or a trial of the pruned study (`llmkd.distill.pruning.train_pruned`)."""
    if threads is not None:
        torch.set_num_threads(threads)
    if pruning is None:
        train(cfg, resume=resume)
    else:
        train_pruned(cfg, pruning, resume=resume)


def train_many(cfgs: list[Config], jobs: int = 1, resume: bool = False, pruning: Pruning | None = None) -> None:
    """Train students, `jobs` at a time in worker processes that share the CPU cores between them;
    with `resume`, a run killed earlier continues from its last checkpoint."""
    if jobs <= 1 or len(cfgs) <= 1:
        for cfg in cfgs:
            train_one(cfg, resume, pruning)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(train_one, cfg, resume, pruning, threads) for cfg in cfgs]):
            future.result()
