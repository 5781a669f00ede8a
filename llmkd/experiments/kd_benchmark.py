"""Which distillation helps: the no-KD student against every KD variant, searched on valid, over seeds.

1. Search: each variant family (a KD loss, embedding distillation, alignment, the multi-task head) is
   trained at one seed for every point of its grid; the point with the best valid NDCG@10 (early
   stopping is on valid too) is chosen. Test is never looked at here.
2. The no-KD twin and every family at its chosen point (plus `combined`: the teacher's item features
   and the multi-task head, each at its chosen point) are trained at every seed (`llmkd.experiments.seeds.run_seeds`; the search
   run is reused for its seed) and evaluated on test once.
3. Diagnostics: teacher-student top-10 overlap; the lift of the best variant (chosen on valid)
   split by the test item's popularity (head / tail) and by the user's history length (short / long);
   the teacher's headroom (student + teacher scores ranked together, the weight chosen on valid).

Writes `<out_dir>/kd_benchmark/`: results.md, results.json, seeds.png (test NDCG@10 per system).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmkd.infra.artifacts import atomic_dir, write_json
from llmkd.experiments.seeds import paired_difference, run_seeds, seeds_markdown, variant_config
from llmkd.infra.config import Config, load_config
from llmkd.data import RecData, load_data
from llmkd.evaluation.metrics import evaluate_scores, mask_seen, paired_bootstrap
from llmkd.infra.locks import locked
from llmkd.distill.pruning import Pruning
from llmkd.distill.recipe import FAMILIES, run_search
from llmkd.evaluation.report import load_student, student_scorer
from llmkd.teacher import TeacherCache

NO_KD = "student_no_kd"
CONTROLS = {"control_shuffled": "shuffled", "control_random": "random"}
HEADROOM_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)  # teacher-score weights of the serving-time ensemble


def search(cfg: Config, families: dict[str, tuple[list[str], dict[str, list]]], seed: int, jobs: int = 1,
           budget_s: float | None = None, twins: dict[str, list[str]] | None = None,
           pruning: Pruning | None = None) -> tuple[dict, dict, dict]:
    """The recipe search (`llmkd.distill.recipe.run_search`) at `seed` into `<out_dir>/kd_benchmark/search/`.

    Returns, per family, its runs and the valid-best point (`{"fixed", "runs", "chosen"}`), the
    combinations the search trained (`{name: {"overrides", "folder", "valid_ndcg@10"}}`), and the search's
    report (its chosen twin: `twin`, `twin_overrides`; its chosen recipe: `chosen_overrides`)."""
    report = run_search(cfg, families, budget_s, jobs, seed, folder="kd_benchmark/search", twins=twins,
                        pruning=pruning)
    cands = [c for c in report["candidates"] if "valid_ndcg@10" in c]
    found = {}
    for family, (fixed, _) in families.items():
        runs = [{"overrides": c["overrides"][len(fixed):], "folder": c["folder"], "valid_ndcg@10": c["valid_ndcg@10"],
                 "best_epoch": c["best_epoch"]} for c in cands if c["family"] == family]
        if runs:
            found[family] = {"fixed": fixed, "runs": runs, "chosen": max(runs, key=lambda r: r["valid_ndcg@10"])}
    combos = {c["name"]: {k: c[k] for k in ("overrides", "folder", "valid_ndcg@10")}
              for c in cands if c["family"] == "combination"}
    return found, combos, report


def control_variants(chosen: list[str], content_init: list[str] | None) -> dict[str, list[str]]:
    """The controls of initialising ids from the teacher's item vectors: the recipe chosen on valid (or, when
    it does not use `content_init`, the content_init family's chosen point) with those vectors' rows shuffled
    across items, and with random rows at their scale (`student.content_init_source`); none without either."""
    base = chosen if load_config(None, chosen).student.content_init else content_init
    if not base:
        return {}
    return {name: [*base, f"student.content_init_source={source}"] for name, source in CONTROLS.items()}


def lift_verdicts(paired: dict, systems: list[str], against: list[str], split: str = "test") -> dict[str, str]:
    """Per system: 'lift' when the paired interval's lower bound on `split` is above 0 against every system
    in `against` (the twin and the controls), else which comparisons it does not clear."""
    out = {}
    for name in systems:
        short = [b for b in against if b != name and paired[f"{name} - {b}"][split]["lo"] <= 0]
        out[name] = "lift" if not short else "not a lift: interval reaches 0 vs " + ", ".join(short)
    return out


def topk_lists(data: RecData, split: str, score_fn, k: int = 10, batch_size: int = 512) -> np.ndarray:
    """(n_eval_users, k) top-k unseen items of a full-catalog scorer."""
    users = data.eval_users(split)
    out = []
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        scores = mask_seen(score_fn(batch, split).float().clone(), [data.history(u, split) for u in batch])
        out.append(torch.topk(scores, k, dim=1).indices.numpy())
    return np.concatenate(out)


def overlap_at_k(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over users of |top-k(a) & top-k(b)| / k."""
    return float(np.mean([len(set(x) & set(y)) / a.shape[1] for x, y in zip(a, b)]))


def groups(data: RecData, head_share: float = 0.2) -> dict[str, np.ndarray]:
    """Boolean masks over test users: test item in the head (the `head_share` most-interacted items in
    train) or tail, and the rarest tail (items with < 10 train interactions); history (train + valid) at
    most the median length (short) or longer (long)."""
    users = data.eval_users("test")
    counts = data.item_counts()
    head_items = np.argsort(-counts, kind="stable")[: max(1, round(head_share * data.num_items))]
    target = data.targets("test")[users]
    head = np.isin(target, head_items)
    length = np.array([len(data.history(u, "test")) for u in users])
    short = length <= np.median(length)
    return {"head items": head, "tail items": ~head, "rare items (< 10 train interactions)": counts[target] < 10,
            "short histories": short, "long histories": ~short}


def diagnostics(cfg: Config, data: RecData, variants: dict[str, list[str]], seeds: list[int], per_user: dict,
                best: str) -> dict:
    """Top-10 overlap with the teacher per system (mean over seeds), and `best`'s lift by group."""
    out = Path(cfg.out_dir)
    teacher = TeacherCache(out / cfg.distill.teacher, data)
    t_top = topk_lists(data, "test", teacher.scorer())
    overlap = {}
    for name, overrides in variants.items():
        vals = []
        for seed in seeds:
            model = load_student(out / variant_config(cfg, name, overrides, seed).distill.name, data, out)
            vals.append(overlap_at_k(t_top, topk_lists(data, "test", student_scorer(model, data))))
        overlap[name] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    a = np.mean([per_user[best][s]["test"]["ndcg@10"] for s in seeds], 0)
    b = np.mean([per_user[NO_KD][s]["test"]["ndcg@10"] for s in seeds], 0)
    t = evaluate_scores(data, "test", teacher.scorer(), (10,), name=cfg.distill.teacher)["ndcg@10"]
    lift = {}
    for group, mask in groups(data).items():
        if not mask.any():  # e.g. no test item is rare
            continue
        lift[group] = {"users": int(mask.sum()), "teacher": float(t[mask].mean()), "no_kd": float(b[mask].mean()),
                       best: float(a[mask].mean()),
                       "relative": float(a[mask].mean() / max(b[mask].mean(), 1e-12)),
                       "paired": paired_bootstrap(a[mask], b[mask], cfg.eval.bootstrap)}
    headroom = teacher_headroom(cfg, data, variants, seeds, list(dict.fromkeys([NO_KD, best])))
    for h in headroom.values():
        ens = h["test"].pop("per_user")
        h["valid"].pop("per_user")
        h["relative"] = float(ens.mean() / max(b.mean(), 1e-12))
        h["paired"] = paired_bootstrap(ens, b, cfg.eval.bootstrap)
    return {"overlap@10": overlap, "lift": lift, "best": best, "teacher_headroom": headroom}


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Per-row z-scores, so scores on different scales (teacher cosine, student dot product) can be added."""
    return (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-6)


def teacher_headroom(cfg: Config, data: RecData, variants: dict[str, list[str]], seeds: list[int], systems: list[str],
                     weights: tuple[float, ...] = HEADROOM_WEIGHTS) -> dict:
    """What the teacher's scores add to a trained student when both are at hand: rank by
    standardize(student) + w * standardize(teacher), w chosen on valid per seed (w = 0 is the student
    alone), test reported. An ensemble that barely beats the student says the teacher's rankings hold
    little the student lacks, so score distillation has little to transfer (a yardstick, not a bound)."""
    out = Path(cfg.out_dir)
    teacher = TeacherCache(out / cfg.distill.teacher, data).scorer()
    users = {split: data.eval_users(split) for split in ("valid", "test")}
    row = {split: np.full(data.num_users, -1) for split in users}
    for split, u in users.items():
        row[split][u] = np.arange(len(u))
    t = {split: standardize(teacher(u, split).float()) for split, u in users.items()}
    result = {}
    for name in systems:
        chosen, per_user = [], {"valid": [], "test": []}
        for seed in seeds:
            model = load_student(out / variant_config(cfg, name, variants[name], seed).distill.name, data, out)
            scorer = student_scorer(model, data)
            s = {split: standardize(scorer(u, split).float()) for split, u in users.items()}

            def ndcg(split: str, w: float) -> np.ndarray:
                mixed = s[split] + w * t[split]
                return evaluate_scores(data, split, lambda b, sp: mixed[row[sp][b]], (10,),
                                       name=f"{name} seed {seed} + {w} x teacher")["ndcg@10"]

            valid = {w: ndcg("valid", w) for w in weights}
            w = max(weights, key=lambda w: valid[w].mean())  # first (smallest) weight on ties
            chosen.append(w)
            per_user["valid"].append(valid[w])
            per_user["test"].append(ndcg("test", w))
        result[name] = {"weights": chosen, **{split: {"mean": float(np.mean([v.mean() for v in vals])),
                                                      "std": float(np.std([v.mean() for v in vals], ddof=1))
                                                      if len(vals) > 1 else 0.0, "per_user": np.mean(vals, 0)}
                                              for split, vals in per_user.items()}}
    return result


def targets(rows: dict, best: str, teacher: str, peer: tuple[str, float], ratio: tuple[float, float]) -> list[str]:
    """The targets (relative lift: `ratio` = (target, stretch)), each checked from the measured rows (test
    NDCG@10, means over seeds)."""
    mean = {n: rows[n]["test"]["ndcg@10"]["mean"] for n in (best, NO_KD, teacher)}
    std = {n: rows[n]["test"]["ndcg@10"]["std"] for n in (best, NO_KD)}
    lift, gap = mean[best] / mean[NO_KD], mean[best] - mean[NO_KD]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return [
        f"- best variant on valid: **{best}**; test NDCG@10 {mean[best]:.4f} vs no-KD {mean[NO_KD]:.4f} = {lift:.3f}x "
        f"(target >= {ratio[0]:.2f}x: {verdict(lift >= ratio[0])}; stretch {ratio[1]:.2f}x: {verdict(lift >= ratio[1])})",
        f"- gap {gap:+.4f} vs the two stds added {std[best] + std[NO_KD]:.4f}: {verdict(gap > std[best] + std[NO_KD])}",
        f"- vs {peer[0]} {peer[1]:.4f}: {verdict(mean[best] >= peer[1])}",
        f"- vs its own teacher {mean[teacher]:.4f}: {verdict(mean[best] >= mean[teacher])}",
    ]


def kd_markdown(found: dict, report: dict, diag: dict, target_lines: list[str], seeds: list[int],
                search_seed: int, verdicts: dict[str, str]) -> str:
    lines = [f"## Search on valid (seed {search_seed}; the chosen point per family in bold)", "",
             "| family | overrides | valid NDCG@10 | best epoch |", "|---|---|---|---|"]
    for family, f in found.items():
        for r in f["runs"]:
            cells = [", ".join(f["fixed"] + r["overrides"]), f"{r['valid_ndcg@10']:.4f}", str(r["best_epoch"])]
            if r == f["chosen"]:  # equal, not identical: the report is also written from its JSON (experiments.docs)
                cells = [f"**{c}**" for c in cells]
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines += ["", f"## Test, chosen points, seeds {seeds}", "", report["markdown"], "",
              f"Lift verdicts (test): a system counts as a lift only when its paired interval is above 0 against "
              f"{NO_KD} and every control ({', '.join(CONTROLS)}, where the recipe has them).", "",
              "| system | verdict |", "|---|---|", *(f"| {n} | {v} |" for n, v in verdicts.items()),
              "", "## Targets", "", *target_lines,
              "", "## Diagnostics (test)", "", "Top-10 overlap with the teacher (mean over seeds):", "",
              "| system | overlap@10 |", "|---|---|"]
    for name, o in diag["overlap@10"].items():
        lines.append(f"| {name} | {o['mean']:.3f} ± {o['std']:.3f} |")
    best = diag["best"]
    lines += ["", f"Lift of {best} over {NO_KD} by group (per-user NDCG@10 averaged over seeds; 95% paired bootstrap):", "",
              f"| group | users | teacher | {NO_KD} | {best} | relative | paired difference |", "|---|---|---|---|---|---|---|"]
    for group, g in diag["lift"].items():
        p = g["paired"]
        lines.append(f"| {group} | {g['users']} | {g['teacher']:.4f} | {g['no_kd']:.4f} | {g[best]:.4f} | {g['relative']:.3f}x | "
                     f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}] |")
    lines += ["", "Teacher headroom: rank by standardized student scores + w x standardized teacher scores, w chosen on "
              f"valid per seed from {list(HEADROOM_WEIGHTS)} (w = 0: the student alone); an ensemble that barely beats "
              "the student means the teacher's rankings hold little the student lacks.", "",
              f"| student + teacher scores | w per seed | valid NDCG@10 | test NDCG@10 | vs {NO_KD} alone | paired difference |",
              "|---|---|---|---|---|---|"]
    for name, h in diag["teacher_headroom"].items():
        p = h["paired"]
        lines.append(f"| {name} + teacher | {', '.join(f'{w:g}' for w in h['weights'])} | "
                     f"{h['valid']['mean']:.4f} ± {h['valid']['std']:.4f} | {h['test']['mean']:.4f} ± {h['test']['std']:.4f} | "
                     f"{h['relative']:.3f}x | {p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}] |")
    return "\n".join(lines)


@locked(lambda a: Path(a["cfg"].out_dir) / "kd_benchmark")
def run_kd_benchmark(cfg: Config, seeds: list[int], families: dict | None = None, search_seed: int | None = None,
                     peer: tuple[str, float] = ("SASRec (RecBole, docs/peers.md)", 0.0959), jobs: int = 1,
                     budget_s: float | None = None, ratio: tuple[float, float] = (1.10, 1.20),
                     twins: dict[str, list[str]] | None = None, pruning: Pruning | None = None) -> dict:
    """Search, seeds, diagnostics; writes `<out_dir>/kd_benchmark/`. `pruning`: the search stops losing
    candidates early (`llmkd.distill.pruning`); the seeds train to their early stop as always."""
    families = families or FAMILIES
    search_seed = seeds[0] if search_seed is None else search_seed
    data = load_data(Path(cfg.out_dir) / "data")
    found, combos, searched = search(cfg, families, search_seed, jobs, budget_s, twins, pruning)
    variants = {NO_KD: searched["twin_overrides"]}  # the strongest twin the search trained, not the configured one
    aliases = {(NO_KD, search_seed): [t["folder"] for t in searched["candidates"] if t["name"] == searched["twin"]]}
    for family, f in found.items():
        variants[family] = [*f["fixed"], *f["chosen"]["overrides"]]
        aliases[(family, search_seed)] = [f["chosen"]["folder"]]
    for name, c in combos.items():  # content + score loss / alignment, each at its chosen point
        variants[name] = c["overrides"]
        aliases[(name, search_seed)] = [c["folder"]]
    controls = control_variants(searched["chosen_overrides"], variants.get("content_init"))
    variants.update(controls)
    report = run_seeds(cfg, seeds, variants, aliases, report="kd_benchmark/seeds", jobs=jobs)
    rows = report["rows"]
    teachers = [v for v in variants if v != NO_KD and v not in controls]
    best = max(teachers, key=lambda v: rows[v]["valid"]["ndcg@10"]["mean"])
    for a in teachers:  # every teacher variant against each control, with the same paired rule
        for c in controls:
            report["paired"][f"{a} - {c}"] = paired_difference(report["per_user"], a, c, seeds, cfg.eval.bootstrap)
    verdicts = lift_verdicts(report["paired"], teachers, [NO_KD, *controls])
    report["markdown"] = seeds_markdown(rows, report["paired"], seeds)  # with the control comparisons
    diag = diagnostics(cfg, data, variants, seeds, report["per_user"], best)
    target_lines = targets(rows, best, cfg.distill.teacher, peer, ratio)
    md = kd_markdown(found, report, diag, target_lines, seeds, search_seed, verdicts)
    folder = Path(cfg.out_dir) / "kd_benchmark" / "summary"
    with atomic_dir(folder) as tmp:
        write_json(tmp / "results.json", {"chosen": best, "seeds": seeds, "search": found, "variants": variants, "rows": rows,
                                          "twin": searched["twin"], "controls": controls, "verdicts": verdicts,
                                          "paired": report["paired"], "diagnostics": diag, "targets": target_lines})
        (tmp / "results.md").write_text(md + "\n", encoding="utf-8")
        (tmp / "seeds.png").write_bytes((report["folder"] / "seeds.png").read_bytes())
    return {"markdown": md, "folder": folder, "rows": rows, "diagnostics": diag}
