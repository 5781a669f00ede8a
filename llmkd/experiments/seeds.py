"""Students with and without the teacher over several seeds: mean +- std and paired intervals.

Each (variant, seed) trains with `llmkd.distill.train` into `<out_dir>/seeds/<variant>_s<seed>` (the
run's data/ and teacher/ are reused), is selected on valid and evaluated once on test. Writes
`<out_dir>/seeds/results.json`, `results.md` and `seeds.png`.
"""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import numpy as np

from llmkd.data import load_data
from llmkd.distill.recipe import NO_TEACHER_OVERRIDES, train_many
from llmkd.evaluation.metrics import evaluate_scores, paired_bootstrap, popularity_scorer, summarize
from llmkd.evaluation.report import SPLITS, load_student, student_scorer
from llmkd.infra.artifacts import LlmkdError, atomic_dir, write_json
from llmkd.infra.config import Config, apply_overrides, from_dict
from llmkd.infra.locks import locked
from llmkd.infra.reuse import reuse, runs_in
from llmkd.student import TwoTower
from llmkd.teacher import TeacherCache

DEFAULT_VARIANTS = {"student_no_kd": NO_TEACHER_OVERRIDES, "student_kd": []}
REPORTED = ("ndcg@10", "recall@10", "recall@50")


def variant_config(cfg: Config, name: str, overrides: list[str], seed: int) -> Config:
    raw = apply_overrides(copy.deepcopy(cfg.to_dict()), [*overrides, f"distill.seed={seed}",
                                                         f"distill.name=seeds/{name}_s{seed}"])
    return from_dict(Config, raw)


@locked(lambda a: Path(a["cfg"].out_dir) / a["report"])
def run_seeds(cfg: Config, seeds: list[int], variants: dict[str, list[str]] | None = None,
              aliases: dict[tuple[str, int], list[str]] | None = None, report: str = "seeds_report",
              jobs: int = 1, reuse_from: list[Path] = ()) -> dict:
    """Train and evaluate every variant at every seed; aggregate over seeds. `aliases[(variant, seed)]`
    lists run folders (under out_dir) that may already hold that run (see `reuse`), as may every run folder
    at the top of out_dir and inside the `reuse_from` folders (e.g. a recipe search's runs); `jobs` students
    train at a time."""
    variants = variants or DEFAULT_VARIANTS
    if not {10, 50} <= set(cfg.eval.ks):
        raise LlmkdError(f"eval.ks: the seeds report needs cut-offs 10 and 50 ({', '.join(REPORTED)}); got {cfg.eval.ks}")
    out = Path(cfg.out_dir)
    data = load_data(out / "data")
    per_user: dict[str, dict[int, dict]] = {}
    pool = runs_in([out, *reuse_from])  # e.g. a run trained by hand with a variant's settings, under any name
    missing = [vcfg for name, overrides in variants.items() for seed in seeds
               if not reuse(vcfg := variant_config(cfg, name, overrides, seed), data.fingerprint,
                            [*(out / a for a in (aliases or {}).get((name, seed), [])), *pool], data.num_items)]
    train_many(missing, jobs, resume=True)  # a run killed earlier continues from its checkpoint
    for name, overrides in variants.items():
        per_user[name] = {}
        for seed in seeds:
            vcfg = variant_config(cfg, name, overrides, seed)
            model = load_student(out / vcfg.distill.name, data, out)
            fn = student_scorer(model, data)
            per_user[name][seed] = {s: evaluate_scores(data, s, fn, cfg.eval.ks, cfg.eval.batch_size, name=f"{name} seed {seed}")
                                    for s in SPLITS}
    baselines = {"popularity": popularity_scorer(data)}
    learned = [variant_config(cfg, n, o, seeds[0]).distill.teacher for n, o in variants.items()]
    beside = sorted(p.parent.name for p in out.glob("*/meta.json")  # e.g. teacher_zero_shot
                    if json.loads(p.read_text(encoding="utf-8")).get("stage") == "teacher")
    for folder in dict.fromkeys([*learned, *beside]):
        if (out / folder).exists():  # every teacher some variant learns from, and the other teacher caches
            baselines[folder] = TeacherCache(out / folder, data).scorer()
    rows = {}
    for name, fn in baselines.items():
        m = {s: summarize(evaluate_scores(data, s, fn, cfg.eval.ks, cfg.eval.batch_size, name=name)) for s in SPLITS}
        rows[name] = {s: {k: {"mean": m[s][k], "std": 0.0} for k in REPORTED} for s in SPLITS}
    rows.update(aggregate_rows(per_user))
    base, *others = list(variants)
    paired = {f"{a} - {base}": paired_difference(per_user, a, base, seeds, cfg.eval.bootstrap)
              for a in others}  # every variant against the first (the no-KD twin)
    md = seeds_markdown(rows, paired, seeds)
    with atomic_dir(out / report) as tmp:
        write_json(tmp / "results.json", {"seeds": seeds, "variants": variants, "rows": rows, "paired": paired})
        (tmp / "results.md").write_text(md + "\n", encoding="utf-8")
        plot_seeds(rows, tmp / "seeds.png")
    return {"rows": rows, "paired": paired, "markdown": md, "per_user": per_user, "folder": out / report}


def aggregate_rows(per_user: dict[str, dict[int, dict]]) -> dict:
    """Per system: mean ± std over seeds of each reported metric per split, and each seed's summary."""
    rows = {}
    for name, by_seed in per_user.items():
        rows[name] = {s: {k: {"mean": float(np.mean([summarize(r[s])[k] for r in by_seed.values()])),
                              "std": float(np.std([summarize(r[s])[k] for r in by_seed.values()], ddof=1))
                              if len(by_seed) > 1 else 0.0}
                          for k in REPORTED} for s in SPLITS}
        rows[name]["per_seed"] = {seed: {s: summarize(r[s]) for s in SPLITS} for seed, r in by_seed.items()}
    return rows


def compare_folders(cfg: Config, systems: dict[str, list[Path]], output: Path,
                    references: dict[str, dict] | None = None) -> dict:
    """Students already trained (exported folders, or a checkpoint's `best/`), one folder per seed and system:
    valid and test per user, rows over seeds and every system paired with the first, written to
    `output`.{json,md}; for runs stopped before early stopping ended them, with what each had reached; each
    run's valid curve in `output`_curves.png, beside the `references` curves (`plot_valid_curves`)."""
    data = load_data(Path(cfg.out_dir) / "data")
    seeds = list(range(len(next(iter(systems.values())))))
    if any(len(f) != len(seeds) for f in systems.values()):
        raise LlmkdError(f"compare: every system needs the same number of folders (one per seed), got "
                         f"{ {n: len(f) for n, f in systems.items()} }")
    per_user, runs = {}, {}
    for name, folders in systems.items():
        per_user[name] = {}
        for seed, folder in zip(seeds, folders):
            folder = Path(folder)
            progress = run_progress(folder)  # before the weights: a run still training may write a new best/
            model = (load_student(folder, data, Path(cfg.out_dir)) if (folder / "meta.json").is_file()
                     else TwoTower.from_pretrained(folder))  # a checkpoint's best/: the weights alone
            fn = student_scorer(model, data)
            per_user[name][seed] = {s: evaluate_scores(data, s, fn, cfg.eval.ks, cfg.eval.batch_size, name=str(folder))
                                    for s in SPLITS}
            if run_progress(folder)["best_epoch"] != progress["best_epoch"]:
                raise LlmkdError(f"{folder}: its run found a better epoch while it was being compared (it is still "
                                 "training, and best/ may hold either epoch); compare again, or once it has finished")
            runs[f"{name} seed {seed}"] = progress
    rows = aggregate_rows(per_user)
    base, *others = list(systems)
    paired = {f"{a} - {base}": paired_difference(per_user, a, base, seeds, cfg.eval.bootstrap) for a in others}
    md = compare_markdown({"seeds": seeds, "runs": runs, "rows": rows, "paired": paired})
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output.with_suffix(".json"), {"seeds": seeds, "runs": runs, "rows": rows, "paired": paired,
                                             "references": references or {}})
    output.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    plot_valid_curves(runs, references or {}, output.with_name(output.name + "_curves.png"))
    return {"rows": rows, "paired": paired, "markdown": md, "runs": runs}


def run_progress(folder: Path) -> dict:
    """Best epoch and epochs trained of a student folder: from its meta.json (finished), or, for a checkpoint's
    `best/`, from the train state beside it (`last/train_state.json`)."""
    folder = Path(folder)
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return {"folder": str(folder), "best_epoch": meta["best_epoch"], "epochs_run": meta["epochs_run"], "finished": True,
                "valid_curve": valid_curve(meta["history"])}
    state = folder.parent / "last" / "train_state.json"
    if folder.name != "best" or not state.is_file():
        raise LlmkdError(f"{folder}: neither a finished student (meta.json) nor a checkpoint's best/ (with last/)")
    st = json.loads(state.read_text(encoding="utf-8"))
    return {"folder": str(folder), "best_epoch": st["best_epoch"], "epochs_run": st["epoch"], "finished": False,
            "valid_curve": valid_curve(st["history"])}


def valid_curve(history: list[dict]) -> dict[str, list]:
    """A run's valid NDCG@10 per epoch, from its history (meta.json or the train state)."""
    return {"epochs": [h["epoch"] for h in history], "values": [h["ndcg@10"] for h in history]}


def plot_valid_curves(runs: dict[str, dict], references: dict[str, dict], path: Path) -> None:
    """Each run's valid NDCG@10 by epoch (`run_progress`), with reference curves (e.g. a published run's log:
    {"epochs": [...], "values": [...]}) dashed beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in runs.items():
        ax.plot(run["valid_curve"]["epochs"], run["valid_curve"]["values"], label=name, lw=1.5)
    for name, ref in references.items():
        ax.plot(ref["epochs"], ref["values"], "k--", marker=".", lw=1, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid NDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired_difference(per_user: dict, a: str, b: str, seeds: list[int], n: int = 1000) -> dict:
    """NDCG@10 of system `a` minus `b` per split: the 95 % bootstrap interval of the per-user difference (the
    per-user metric averaged over seeds; users resampled) and, beside it, the difference at each seed."""
    out = {}
    for s in SPLITS:
        a_u = [per_user[a][sd][s]["ndcg@10"] for sd in seeds]
        b_u = [per_user[b][sd][s]["ndcg@10"] for sd in seeds]
        out[s] = {**paired_bootstrap(np.mean(a_u, 0), np.mean(b_u, 0), n),
                  "per_seed": {sd: float(x.mean() - y.mean()) for sd, x, y in zip(seeds, a_u, b_u)}}
    return out


def interval_cell(p: dict) -> str:
    """'+0.0133 [+0.0118, +0.0150]; seeds +0.012, +0.014, +0.013' for one split of `paired_difference`."""
    cell = f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]"
    if "per_seed" in p:
        cell += "; seeds " + ", ".join(f"{v:+.4f}" for v in p["per_seed"].values())
    return cell


def seeds_markdown(rows: dict, paired: dict, seeds: list[int]) -> str:
    cols = [("valid", "ndcg@10")] + [("test", k) for k in REPORTED]
    lines = [f"Students: mean ± std over seeds {seeds} (selected on valid NDCG@10; test reported once).", "",
             "| system | " + " | ".join(f"{s} {k}" for s, k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[s][k]['mean']:.4f} ± {r[s][k]['std']:.4f}" if r[s][k]["std"] else f"{r[s][k]['mean']:.4f}"
                 for s, k in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Paired per-user NDCG@10 difference (per-user metric averaged over seeds; 95% bootstrap interval "
              "over users; then the difference at each seed):", "", "| comparison | valid | test |", "|---|---|---|"]
    for key, by in paired.items():
        lines.append(f"| {key} | " + " | ".join(interval_cell(by[s]) for s in SPLITS) + " |")
    return "\n".join(lines)


def compare_markdown(r: dict) -> str:
    """The report of `compare_folders` from its JSON (`seeds`, `runs`, `rows`, `paired`): the seeds table, then
    each run's best epoch and whether it was stopped before early stopping ended it."""
    return seeds_markdown(r["rows"], r["paired"], r["seeds"]) + (
        "\n\nRuns (best epoch / epochs trained; 'stopped' = ended before early stopping did):\n\n" + "\n".join(
            f"- {k}: {v['folder']}, best epoch {v['best_epoch']} of {v['epochs_run']}{'' if v['finished'] else ', stopped'}"
            for k, v in r["runs"].items()))


def plot_seeds(rows: dict, path: Path) -> None:
    """Bars: test NDCG@10 mean +- std per system; dots: each seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    labels = [textwrap.fill(n.replace("+", " + ").replace("_", " "), 38) for n in names]  # long combination names
    lines_per = [label.count("\n") + 1 for label in labels]
    fig, ax = plt.subplots(figsize=(9.0, 1.2 + 0.28 * sum(lines_per) + 0.12 * len(names)))
    for i, name in enumerate(names):
        if "per_seed" in rows[name]:
            vals = [r["test"]["ndcg@10"] for r in rows[name]["per_seed"].values()]
            ax.scatter(vals, [i] * len(vals), color="k", s=12, zorder=3)
        ax.barh(i, rows[name]["test"]["ndcg@10"]["mean"], xerr=rows[name]["test"]["ndcg@10"]["std"], alpha=0.6)
    ax.set_yticks(range(len(names)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test NDCG@10 (bars: mean ± std over seeds; dots: each seed)")
    ax.grid(axis="x", alpha=0.3)
    fig.subplots_adjust(left=0.36, right=0.97, top=0.98, bottom=0.9 / fig.get_figheight())
    fig.savefig(path, dpi=120)
    plt.close(fig)
