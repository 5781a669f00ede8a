"""The evaluation stage: every system of a run on valid and test, written to `eval/`.

Artifact `eval/`:
    metrics.json   {system: {split: {"ndcg@10": value, ...}}}
    paired.json    per-user paired differences (95% bootstrap intervals) between systems
    protocol.json  the protocol's rules (`llmkd.evaluation.metrics.PROTOCOL`, also in meta.json) and, per split,
                   how many users' held-out item repeats one in their history (masked: a miss for every system)
    results.md     the markdown tables (metrics, paired comparison, stage cost), the protocol in a sentence
    valid_curve.png  valid NDCG@10 per epoch of each student
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llmkd.data import RecData, load_data
from llmkd.evaluation.metrics import (
    PROTOCOL,
    DotScorer,
    evaluate_retrieval,
    evaluate_scores,
    paired_bootstrap,
    popularity_scorer,
    repeated_targets,
    sample_users,
    summarize,
)
from llmkd.index import load_index, search
from llmkd.infra.artifacts import LlmkdError, StageTimer, atomic_dir, new_meta, read_meta, write_json
from llmkd.infra.config import Config
from llmkd.infra.lineage import check_lineage, input_record
from llmkd.infra.locks import locked
from llmkd.student import TwoTower
from llmkd.teacher import TeacherCache

SPLITS = ("valid", "test")
TEACHER_EVAL_KEYS = ("item_emb", "user_valid", "user_test")
"""The teacher cache arrays evaluation reads (the KD positions stay on disk)."""


def table_metrics(ks: list[int]) -> list[str]:
    """Table columns: NDCG and Recall at every K, MRR at the smallest (the first is the primary metric)."""
    k0 = min(ks)
    return [f"ndcg@{k0}", *[f"recall@{k}" for k in sorted(ks)], f"mrr@{k0}", *[f"ndcg@{k}" for k in sorted(ks)[1:]]]


def load_student(folder: Path, data: RecData, out_dir: Path | None = None) -> TwoTower:
    """A student made from `data` whose teacher cache (if any) is the one in `out_dir` (default: the
    student folder's parent) as it was when the student was trained (`llmkd.infra.lineage`)."""
    read_meta(folder, "student")
    check_lineage(folder, Path(out_dir) if out_dir is not None else Path(folder).parent, data.fingerprint)
    return TwoTower.from_pretrained(folder)


@torch.no_grad()
def student_user_vectors(model: TwoTower, data: RecData, users: np.ndarray, split: str) -> torch.Tensor:
    """(B, d) user vectors from each user's history before `split`."""
    hist = model.pad_histories([data.history(u, split) for u in users])
    return model.user_vectors(hist, torch.as_tensor(users))


def student_scorer(model: TwoTower, data: RecData) -> DotScorer:
    """The student's scores, user vectors . item vectors, read in blocks of items (`llmkd.evaluation.metrics`)."""
    return DotScorer(lambda users, split: student_user_vectors(model, data, users, split), model.item_vectors())


def teacher_scorer(cache: TeacherCache) -> DotScorer:
    """The teacher cache's cosine scores (user vector before the split . item vector), read in blocks."""
    return DotScorer(lambda users, split: cache.arrays[f"user_{split}"][torch.as_tensor(users)], cache.item_emb)


def faiss_retriever(model: TwoTower, data: RecData, index_dir: Path):
    """Top-k retrieval through the index, which must be built from this student as it is now."""
    index, item_ids, meta = load_index(index_dir)
    check_lineage(index_dir, index_dir.parent, data.fingerprint)
    if item_ids != data.item_ids:
        raise LlmkdError(f"{index_dir}: item ids differ from the data artifact's; rebuild the index")
    if index.d != model.item_vectors().shape[1]:  # an index older than lineage records
        raise LlmkdError(f"{index_dir}: stale, {index.d}-d vectors but the student {meta['student']} has "
                         f"{model.item_vectors().shape[1]}; rebuild it: python scripts/build_index.py "
                         f"--config <config> --student {meta['student']}")
    return lambda users, split, k: search(index, student_user_vectors(model, data, users, split).numpy(), k)[1]


def markdown_table(metrics: dict, columns: list[str]) -> str:
    head = "| system | " + " | ".join(f"valid {c}" for c in columns[:1]) + " | " + " | ".join(f"test {c}" for c in columns) + " |"
    lines = [head, "|" + "---|" * (2 + len(columns))]
    for system, by_split in metrics.items():
        cells = [f"{by_split['valid'][columns[0]]:.4f}"] + [f"{by_split['test'][c]:.4f}" for c in columns]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_costs(out: Path, names: list[str]) -> str:
    """Wall time, peak memory and parameters of each artifact that recorded them."""
    lines = ["| stage | wall s | peak RSS MiB | parameters |", "|---|---|---|---|"]
    for name in names:
        path = out / name / "meta.json"
        if not path.is_file():
            continue
        meta = json.loads(path.read_text())
        t = meta.get("timing") or {}
        lines.append(f"| {name} | {t.get('wall_seconds', '')} | {t.get('peak_rss_mb', '')} | {meta.get('num_parameters', '')} |")
    return "\n".join(lines)


def plot_curves(out: Path, students: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in students:
        hist = read_meta(out / name, "student")["history"]
        ax.plot([h["epoch"] for h in hist], [h["ndcg@10"] for h in hist], marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid NDCG@10")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def teacher_label(folder: str) -> str:
    """The system name of the teacher cache in `out_dir/<folder>`: 'teacher' for the default folder."""
    return "teacher" if folder == "teacher" else f"teacher ({folder})"


@locked(lambda a: Path(a["cfg"].out_dir) / "eval")
def run_evaluation(cfg: Config) -> dict:
    """Evaluate popularity, the teacher (`distill.teacher`), each student exactly, and the indexed student through FAISS."""
    out = Path(cfg.out_dir)
    ks, bs = cfg.eval.ks, cfg.eval.batch_size
    teacher = cfg.distill.teacher
    with StageTimer() as timer:
        data = load_data(out / "data")
        systems = {"popularity": popularity_scorer(data)}
        if (out / teacher).exists():
            systems[teacher_label(teacher)] = teacher_scorer(TeacherCache(out / teacher, data, keys=TEACHER_EVAL_KEYS))
        models = {name: load_student(out / name, data, out) for name in cfg.eval.students}
        systems.update({name: student_scorer(m, data) for name, m in models.items()})
        indexed = None  # every input is read (and refused) before any scoring starts
        if (out / "index").exists() and models:
            index_meta = read_meta(out / "index", "index")
            student = index_meta["student"]
            if student not in models:
                raise LlmkdError(f"{out / 'index'}: built from '{student}', which eval.students does not list")
            indexed = (f"{student}+faiss_{index_meta['config']['type']}",
                       faiss_retriever(models[student], data, out / "index"))
        users = {s: sample_users(data, s, cfg.eval.max_users, cfg.eval.sample_seed) for s in SPLITS}
        per_user = {name: {s: evaluate_scores(data, s, fn, ks, bs, desc=f"eval {name} {s}", name=name,
                                              item_block=cfg.eval.item_block, users=users[s]) for s in SPLITS}
                    for name, fn in systems.items()}
        if indexed is not None:
            name, retrieve = indexed
            per_user[name] = {s: evaluate_retrieval(data, s, retrieve, ks, bs, users=users[s]) for s in SPLITS}
    metrics = {name: {s: summarize(v) for s, v in by.items()} for name, by in per_user.items()}
    columns = table_metrics(cfg.eval.ks)
    primary = columns[0]
    paired = {f"{a} - {b}": {s: paired_bootstrap(per_user[a][s][primary], per_user[b][s][primary], cfg.eval.bootstrap)
                             for s in SPLITS} for a, b in _pairs(list(per_user), teacher_label(teacher))}
    repeated = {s: repeated_targets(data, s, users[s]) for s in SPLITS}
    protocol = {"rules": PROTOCOL, "repeated_targets": repeated}
    sampled = {s: {"evaluated": len(users[s]), "of": len(data.eval_users(s)), "seed": cfg.eval.sample_seed}
               for s in SPLITS if len(users[s]) < len(data.eval_users(s))}
    if sampled:
        protocol["user_sample"] = sampled
    md = ["## Metrics (full ranking, seen items masked)", "",
          "Protocol (docs/protocol.md, `eval/protocol.json`): every item in the user's history is masked; a held-out "
          "item that is also in the history (a repeated interaction) is masked too and counts as a miss at every K: "
          + ", ".join(f"{repeated[s]} of {metrics['popularity'][s]['users']} {s} users" for s in SPLITS) + " here."
          + ("".join(f" **A random sample** of {v['evaluated']:,} of the {v['of']:,} {s} users (eval.max_users, seed "
                     f"{v['seed']}) is evaluated: every system on the same users." for s, v in sampled.items())),
          "", markdown_table(metrics, columns), "",
          f"## Paired {primary} differences (mean, 95% bootstrap interval over users)", "",
          "| comparison | valid | test |", "|---|---|---|"]
    for key, by in paired.items():
        md.append(f"| {key} | " + " | ".join(f"{by[s]['mean']:+.4f} [{by[s]['lo']:+.4f}, {by[s]['hi']:+.4f}]" for s in SPLITS) + " |")
    md += ["", "## Stage cost", "", stage_costs(out, ["data", teacher, *cfg.eval.students, "index"])]
    with atomic_dir(out / "eval") as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "paired.json", paired)
        write_json(tmp / "protocol.json", protocol)
        (tmp / "results.md").write_text("\n".join(md) + "\n", encoding="utf-8")
        if models:
            plot_curves(out, list(models), tmp / "valid_curve.png")
        used = [*([teacher] if teacher_label(teacher) in systems else []), *models, *(["index"] if indexed else [])]
        inputs = {name: input_record(out, out / name) for name in used}
        write_json(tmp / "meta.json", new_meta("eval", cfg.to_dict(), data.fingerprint, protocol=protocol,
                                               inputs=inputs, timing=timer.as_dict()))
    return {"metrics": metrics, "paired": paired, "protocol": protocol, "markdown": "\n".join(md)}


def _pairs(names: list[str], teacher: str = "teacher") -> list[tuple[str, str]]:
    """Comparisons worth a paired interval: KD student vs no-KD twin, each student vs teacher and popularity."""
    pairs = [("student_kd", "student_no_kd")] if {"student_kd", "student_no_kd"} <= set(names) else []
    students = [n for n in names if n.startswith("student") and "+faiss" not in n]
    return pairs + [(s, base) for s in students for base in (teacher, "popularity") if base in names]
