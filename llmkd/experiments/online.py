"""Online cost: what it takes to recommend for one user with the teacher vs with the student.

Teacher: render the user's history as text, encode it with the language model, score the whole
catalog against the (offline, cached) teacher item vectors, take the top K.
Student: pad the history of item ids, run the user tower, search the FAISS index for the top K.
Both start from the same raw history (item ids) and end with K item ids; item vectors are
precomputed for both, as they would be in serving. Both run in this one process, alternating, so a
noisy shared machine slows both alike; medians over repeats are compared.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from llmkd.data import RecData, load_data
from llmkd.evaluation.report import load_student
from llmkd.index import build_index, search
from llmkd.infra.config import Config
from llmkd.teacher import TeacherCache, TextEncoder, adapter_path, user_prompt

Recommender = Callable[[np.ndarray], np.ndarray]  # (B,) users -> (B, K) item ids


def teacher_recommender(cfg: Config, data: RecData, k: int) -> tuple[Recommender, int]:
    """The teacher as an online recommender (history text -> LM -> catalog scores -> top K); its parameter count."""
    out = Path(cfg.out_dir)
    tc = cfg.teacher
    encoder = TextEncoder(tc.model, tc.pooling, tc.batch_size, adapter=adapter_path(tc, out))
    items = TeacherCache(out / cfg.distill.teacher, data).item_emb  # (N, d_t), precomputed offline

    @torch.inference_mode()
    def recommend(users: np.ndarray) -> np.ndarray:
        texts = [user_prompt(data.item_texts, data.history(int(u), "test"), tc) for u in users]
        vectors = torch.as_tensor(encoder.encode(texts, tc.max_history_tokens))
        return torch.topk(vectors @ items.T, k, dim=1).indices.numpy()

    return recommend, encoder.num_parameters()


def student_recommender(cfg: Config, data: RecData, k: int, student: str) -> tuple[Recommender, int]:
    """The student as an online recommender (user tower -> FAISS top K over its item vectors, both
    computed once ahead of serving)."""
    model = load_student(Path(cfg.out_dir) / student, data, Path(cfg.out_dir))
    with torch.inference_mode():
        table = model.item_tower().detach()  # (N + 1, d): what the index holds, plus the padding row
    index = build_index(table[: data.num_items].numpy(), cfg.index)

    @torch.inference_mode()
    def recommend(users: np.ndarray) -> np.ndarray:
        hist = model.pad_histories([data.history(int(u), "test") for u in users])
        return search(index, model.user_vectors(hist, torch.as_tensor(users), table).numpy(), k)[1]

    return recommend, model.num_parameters(trainable_only=False)


def time_calls(fn: Recommender, batches: list[np.ndarray]) -> list[float]:
    """Seconds per call of `fn` on each batch."""
    out = []
    for b in batches:
        t = time.perf_counter()
        fn(b)
        out.append(time.perf_counter() - t)
    return out


def measure_online_cost(cfg: Config, students: list[str], latency_users: int = 100, throughput_users: int = 512,
                        batch_size: int = 256, repeats: int = 3, k: int = 10) -> dict:
    """Per-user latency (batch of 1, median) and throughput (users/s at `batch_size`) of the teacher and
    each student, and each student's ratios to the teacher."""
    data = load_data(Path(cfg.out_dir) / "data")
    users = data.eval_users("test")
    rng = np.random.default_rng(0)
    lat_users = rng.choice(users, min(latency_users, len(users)), replace=False)
    thr_users = rng.choice(users, min(throughput_users, len(users)), replace=False)
    systems = {"teacher": teacher_recommender(cfg, data, k)}
    systems.update({s: student_recommender(cfg, data, k, s) for s in students})
    singles = [np.array([u]) for u in lat_users]
    chunks = [thr_users[i : i + batch_size] for i in range(0, len(thr_users), batch_size)]
    latency: dict[str, list[float]] = {name: [] for name in systems}
    throughput: dict[str, list[float]] = {name: [] for name in systems}
    for fn, _ in systems.values():  # warm-up: first calls allocate and load lazily
        time_calls(fn, singles[:3] + chunks[:1])
    for _ in tqdm(range(repeats), desc="online cost (teacher and students, alternating)"):
        for name, (fn, _) in systems.items():
            latency[name] += time_calls(fn, singles)
            throughput[name].append(len(thr_users) / sum(time_calls(fn, chunks)))
    result = {"users_latency": len(lat_users), "users_throughput": len(thr_users), "batch_size": batch_size,
              "repeats": repeats, "k": k, "threads": torch.get_num_threads(), "index_type": cfg.index.type,
              "num_items": data.num_items, "systems": {}}
    for name, (_, params) in systems.items():
        result["systems"][name] = {"parameters": params,
                                   "latency_ms_p50": 1000 * statistics.median(latency[name]),
                                   "latency_ms_p90": 1000 * float(np.percentile(latency[name], 90)),
                                   "users_per_second": statistics.median(throughput[name])}
    t = result["systems"]["teacher"]
    for name in students:
        s = result["systems"][name]
        s["teacher_over_student"] = {"latency": t["latency_ms_p50"] / s["latency_ms_p50"],
                                     "throughput": s["users_per_second"] / t["users_per_second"],
                                     "parameters": t["parameters"] / s["parameters"]}
    return result


def online_markdown(r: dict) -> str:
    lines = [f"Online cost per user on this CPU ({r['threads']} threads; top-{r['k']} of {r['num_items']} items; "
             f"median of {r['repeats']} alternating repeats; students: user tower + FAISS {r['index_type']}).", "",
             f"| system | parameters | latency p50 (batch 1) | latency p90 | throughput (batch {r['batch_size']}) "
             "| teacher / student: latency | throughput |", "|---|---|---|---|---|---|---|"]
    for name, s in r["systems"].items():
        x = s.get("teacher_over_student")
        ratio = f"{x['latency']:,.0f}x | {x['throughput']:,.0f}x" if x else " | "
        lines.append(f"| {name} | {s['parameters']:,} | {s['latency_ms_p50']:.3f} ms | {s['latency_ms_p90']:.3f} ms | "
                     f"{s['users_per_second']:,.0f} users/s | {ratio} |")
    return "\n".join(lines)
