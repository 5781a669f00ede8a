"""Cold-start items: recommend items that no training stage has seen, from their text alone.

Protocol (`data.cold_items` = f): a random fraction f of the interacted items is withheld with all
its interactions before the split, so the LoRA tuning, the teacher cache and the student all train
on the warm items only. Afterwards each cold item gets
  - a teacher vector: the (tuned) teacher encodes its text;
  - a student vector: the student's item tower maps that teacher vector through its learned content
    projection (`ItemTower.content_proj`; the id embedding is absent, the item was never seen),
so it can be added to the FAISS index and retrieved. Every user who interacted with cold items is
an evaluation user: history = all the user's warm interactions (time order), relevant = the user's
cold items. Two rankings: among the cold items only, and in the whole catalog (warm + cold, the
user's warm history masked), where cold items must compete with the warm ones the student knows.
Metrics: Recall@K = relevant items in the top K / relevant items, NDCG@K (binary relevance).
Popularity has no signal for cold items (no interactions): its expected recall among cold items is
that of a random order, K / #cold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmkd.commands.add_items import add_item_texts, student_item_vectors, teacher_item_vectors
from llmkd.data import RecData, load_data
from llmkd.evaluation.report import load_student
from llmkd.index import build_index, search
from llmkd.infra.artifacts import LlmkdError, atomic_dir, write_json
from llmkd.infra.config import Config
from llmkd.infra.locks import locked
from llmkd.teacher import TeacherCache, TextEncoder, adapter_path, user_prompt


def warm_histories(data: RecData, users: list[int]) -> list[np.ndarray]:
    """Each user's whole warm sequence: train, then valid and test items where present."""
    out = []
    for u in users:
        tail = [x for x in (data.valid_item[u], data.test_item[u]) if x >= 0]
        out.append(np.concatenate([data.train[u], np.asarray(tail, dtype=np.int64)]))
    return out


def set_metrics(top: np.ndarray | list[np.ndarray], relevant: list[set[int]], ks: list[int]) -> dict[str, float]:
    """Recall@K and NDCG@K of ranked lists `top` (one per user) against relevant sets (a list shorter than K,
    e.g. K above the number of candidates, counts what it has)."""
    out = {}
    for k in ks:
        recall, ndcg = [], []
        for row, rel in zip(top, relevant):
            hits = np.array([i in rel for i in row[:k]], dtype=np.float64)
            recall.append(hits.sum() / len(rel))
            ideal = (1.0 / np.log2(np.arange(2, min(len(rel), k) + 2))).sum()
            ndcg.append((hits / np.log2(np.arange(2, len(hits) + 2))).sum() / ideal)
        out[f"recall@{k}"], out[f"ndcg@{k}"] = float(np.mean(recall)), float(np.mean(ndcg))
    return out


def ranked(scores: torch.Tensor, k: int, masks: list[np.ndarray] | None = None) -> np.ndarray:
    """Top-k column indices per row, after masking each row's `masks` columns."""
    scores = scores.clone()
    for row, m in enumerate(masks or []):
        scores[row, torch.as_tensor(m, dtype=torch.long)] = float("-inf")
    return torch.topk(scores, min(k, scores.shape[1]), dim=1).indices.numpy()


@torch.inference_mode()
def cold_start_eval(cfg: Config, students: list[str], ks: tuple[int, ...] = (10, 20, 50)) -> dict:
    """Recall / NDCG on cold items for the teacher, each student (exact and via FAISS) and popularity."""
    out = Path(cfg.out_dir)
    data = load_data(out / "data")
    if not data.cold_item_ids:
        raise LlmkdError(f"{out / 'data'}: no cold items; set data.cold_items (e.g. 0.1) and rerun prepare_data.py")
    users = sorted({u for us in data.cold_item_users for u in us})
    n_warm, n_cold, kmax = data.num_items, len(data.cold_item_ids), max(ks)
    relevant_cold = [set() for _ in users]  # cold-item index sets
    where = {u: row for row, u in enumerate(users)}
    for c, us in enumerate(data.cold_item_users):
        for u in us:
            relevant_cold[where[u]].add(c)
    relevant_all = [{n_warm + c for c in rel} for rel in relevant_cold]  # in the warm + cold catalog
    hists = warm_histories(data, users)
    tc = cfg.teacher
    encoder = TextEncoder(tc.model, tc.pooling, tc.batch_size, adapter=adapter_path(tc, out))
    t_cold = torch.as_tensor(teacher_item_vectors(encoder, data.cold_item_texts, tc))
    t_warm = TeacherCache(out / cfg.distill.teacher, data).item_emb
    t_user = torch.as_tensor(encoder.encode([user_prompt(data.item_texts, h, tc) for h in hists],
                                            tc.max_history_tokens, desc="teacher: users"))
    systems: dict[str, dict] = {}

    def add(name: str, user: torch.Tensor, warm: torch.Tensor, cold: torch.Tensor) -> None:
        systems[name] = {
            "cold items only": set_metrics(ranked(user @ cold.T, kmax), relevant_cold, list(ks)),
            "whole catalog": set_metrics(ranked(user @ torch.cat([warm, cold]).T, kmax, hists), relevant_all, list(ks)),
        }

    add("teacher", t_user, t_warm, t_cold)
    for name in students:
        model = load_student(out / name, data, out)
        s_cold = student_item_vectors(model, t_cold, out / name)
        s_user = model.user_vectors(model.pad_histories(hists))
        s_warm = model.item_vectors()
        add(name, s_user, s_warm, s_cold)
        index = build_index(torch.cat([s_warm, s_cold]).numpy(), cfg.index)  # served: warm + cold in one index
        faiss_top = search(index, s_user.numpy(), kmax + max(len(h) for h in hists))[1]
        faiss_top = [[i for i in row if i >= 0 and i not in seen][:kmax]
                     for row, seen in zip(faiss_top, (set(h.tolist()) for h in hists))]
        systems[f"{name} (FAISS {cfg.index.type})"] = {"whole catalog": set_metrics(faiss_top, relevant_all, list(ks))}
    rng = np.random.default_rng(0)  # popularity = no signal: a random order of the cold items
    systems["popularity (no interactions: random order)"] = {
        "cold items only": set_metrics(np.stack([rng.permutation(n_cold)[:kmax] for _ in users]), relevant_cold, list(ks))}
    counts = torch.as_tensor(data.item_counts(), dtype=torch.float32)
    pop = torch.cat([counts, torch.zeros(n_cold)])[None].expand(len(users), -1)
    systems["popularity (no interactions: random order)"]["whole catalog"] = set_metrics(
        ranked(pop, kmax, hists), relevant_all, list(ks))
    return {"cold_items": n_cold, "warm_items": n_warm, "users": len(users),
            "cold_interactions": int(sum(len(r) for r in relevant_cold)), "ks": list(ks), "systems": systems}


def cold_markdown(r: dict) -> str:
    ks = r["ks"]
    lines = [f"Cold-start items: {r['cold_items']} items withheld ({r['cold_interactions']} interactions of "
             f"{r['users']} users) from {r['cold_items'] + r['warm_items']}; history = each user's warm interactions.", ""]
    for view in ("cold items only", "whole catalog"):
        lines += [f"Ranking {view}:", "", "| system | " + " | ".join(f"Recall@{k}" for k in ks) + f" | NDCG@{ks[0]} |",
                  "|---" * (len(ks) + 2) + "|"]
        for name, by in r["systems"].items():
            if view in by:
                m = by[view]
                lines.append(f"| {name} | " + " | ".join(f"{m[f'recall@{k}']:.4f}" for k in ks) + f" | {m[f'ndcg@{ks[0]}']:.4f} |")
        lines.append("")
    return "\n".join(lines)


@locked(lambda a: Path(a["cfg"].out_dir) / "cold_start")
def run_cold_start(cfg: Config, students: list[str]) -> dict:
    result = cold_start_eval(cfg, students)
    md = cold_markdown(result)
    with atomic_dir(Path(cfg.out_dir) / "cold_start") as tmp:
        write_json(tmp / "results.json", result)
        (tmp / "results.md").write_text(md + "\n", encoding="utf-8")
    return {**result, "markdown": md}


def cold_start_through_bundle(cfg: Config, student: str, output: str | Path,
                              ks: tuple[int, ...] = (10, 20, 50)) -> dict:
    """The cold-start protocol served: export `student`, add the run's withheld items to the
    bundle from their text, and rank the whole catalog for each cold user with `Recommender` (seen items
    excluded). Recall / NDCG match the cold-start evaluation's FAISS row when the added vectors are its vectors."""
    from llmkd.serving import Recommender, export_bundle

    data = load_data(Path(cfg.out_dir) / "data")
    if not data.cold_item_ids:
        raise LlmkdError(f"{Path(cfg.out_dir) / 'data'}: no cold items; set data.cold_items (e.g. 0.1) and rerun "
                         "prepare_data.py")
    bundle = export_bundle(cfg, student, output)
    add_item_texts(bundle, data.cold_item_ids, data.cold_item_texts, source="the run's cold items")
    rec = Recommender.from_pretrained(bundle)
    users = sorted({u for us in data.cold_item_users for u in us})
    relevant = [set() for _ in users]
    where = {u: row for row, u in enumerate(users)}
    for c, us in enumerate(data.cold_item_users):
        for u in us:
            relevant[where[u]].add(data.num_items + c)  # bundle rows: warm items, then the cold ones in order
    hists = [[data.item_ids[i] for i in h] for h in warm_histories(data, users)]
    top = [[rec.row[i] for i in r["items"]] for r in rec.recommend_batch(hists, min(max(ks), rec.num_items))]
    return {"users": len(users), "cold_items": len(data.cold_item_ids), "index": cfg.index.type,
            "whole catalog": set_metrics(top, relevant, list(ks))}
