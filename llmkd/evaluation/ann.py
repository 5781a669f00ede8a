"""Approximate nearest-neighbour sweep: recall@k against exact search and queries/s for each index type
and search setting, and the fastest setting that reaches a target recall.

Every setting is an `IndexConfig`, built by the index stage's own `llmkd.index.empty_index`, so the
chosen one is exactly what `scripts/build_index.py --recipe <fragment>` builds. One index is built per
structure (type, nlist, M, pq_m); search knobs (nprobe, efSearch, k_factor_rf) are then set on it with
FAISS's `ParameterSpace`. Result layout (`results/ann_sweep_cpu.json`):

    {"items": N, "dim": d, "queries": nq, "k": 10, "threads": t, "flat_qps": ...,
     "settings": [{"index": "IVF1265,Flat", "params": {"nprobe": 16}, "config": {IndexConfig fields},
                   "recall@10": ..., "qps": ..., "build_s": ...}, ...],
     "target_recall": 0.95, "choice": <one of settings, or null>}
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.evaluation import knn_intersection_measure

from llmkd.index import (
    empty_index,
    factory_string,
    faiss_index,
    ivf_nlist,
    pq_m,
    search_parameters,
    set_search_parameters,
    uses_l2,
)
from llmkd.infra.config import IndexConfig

NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EF_SEARCHES = (16, 32, 64, 128, 256, 512)
L2_LABEL = " (L2 reduction)"
PQ_MS = (8, 16, 32)


def clustered_vectors(n: int, d: int, n_clusters: int, seed: int, spread: float = 0.5) -> np.ndarray:
    """(n, d) float32 around n_clusters Gaussian centres, like trained embeddings (not uniform noise,
    on which every ANN index is at its worst and no real catalog lies)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d), dtype=np.float32)
    x = centres[rng.integers(0, n_clusters, n)]
    x += spread * rng.standard_normal((n, d), dtype=np.float32)
    return x


def student_vectors(out_dir: str | Path, student: str, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A trained run's item vectors xb (n_items, d) float32 and the user vectors of up to n_queries valid
    users (drawn with `seed`) as queries xq: the vectors the index will really serve."""
    import torch

    from llmkd.data import load_data
    from llmkd.evaluation.report import load_student, student_user_vectors

    out = Path(out_dir)
    data = load_data(out / "data")
    model = load_student(out / student, data, out)
    users = data.eval_users("valid")
    users = np.sort(np.random.default_rng(seed).choice(users, min(n_queries, len(users)), replace=False))
    with torch.inference_mode():
        xq = student_user_vectors(model, data, users, "valid").numpy()
        xb = model.item_vectors().numpy()
    return xb.astype(np.float32), xq.astype(np.float32)


def exact_knn(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with `IndexFlatIP`: D (nq, k) float32, I (nq, k) int64."""
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(np.ascontiguousarray(xb, dtype=np.float32))
    return index.search(np.ascontiguousarray(xq, dtype=np.float32), k)


def recall_at_k(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean over queries of |I[:, :k] ∩ gt[:, :k]| / k (the k-recall@k of FAISS's benchmarks): (nq, >=k)
    int64 each; order within the top k does not matter, -1 (no result) matches nothing."""
    assert I.ndim == gt.ndim == 2 and len(I) == len(gt) and I.shape[1] >= k and gt.shape[1] >= k, (I.shape, gt.shape)
    assert (gt[:, :k] >= 0).all(), "the exact result must have k items per query"
    return float(knn_intersection_measure(I[:, :k], gt[:, :k]))


def timed_search(index: faiss.Index, xq: np.ndarray, k: int, repeats: int) -> tuple[np.ndarray, float]:
    """I (nq, k) and queries/s of searching all of xq (nq, d) in one batch: the best of `repeats` runs."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, I = index.search(xq, k)
        best = min(best, time.perf_counter() - t0)
    return I, len(xq) / best


def default_grid(n: int, d: int, hnsw_m: int = 32, pq_ms: Sequence[int] = PQ_MS,
                 nprobes: Sequence[int] = NPROBES, ef_searches: Sequence[int] = EF_SEARCHES,
                 pq_refines: Sequence[int] = (0,), ip_to_l2: Sequence[bool] = (True, False)
                 ) -> list[tuple[IndexConfig, list[IndexConfig]]]:
    """(structure, its search settings) pairs: flat; IVF with nlist from n (`llmkd.index.ivf_nlist`) and
    each nprobe up to nlist; HNSW with each efSearch; IVF-PQ for each pq_m dividing d (below d) and each
    refine factor (0 = none), with each nprobe, when n is enough to train 256 codes. Each approximate
    structure once per `ip_to_l2` value (the L2 reduction, `llmkd.index.MipsIndex`, or FAISS's inner product)."""
    base = IndexConfig()
    nlist = ivf_nlist(n, base)
    grid = [(base, [base])]
    for l2 in ip_to_l2:
        ivf = dataclasses.replace(base, type="ivf", ip_to_l2=l2)
        grid.append((ivf, [dataclasses.replace(ivf, ivf_nprobe=p) for p in nprobes if p <= nlist]))
        hnsw = dataclasses.replace(base, type="hnsw", hnsw_m=hnsw_m, ip_to_l2=l2)
        grid.append((hnsw, [dataclasses.replace(hnsw, hnsw_ef_search=e) for e in ef_searches]))
        for m in pq_ms:
            for refine in pq_refines:
                if d % m == 0 and m < d and n >= 2 ** base.pq_nbits:  # fewer items cannot train the codes
                    pq = dataclasses.replace(base, type="ivfpq", pq_m=m, pq_refine=refine, ip_to_l2=l2)
                    grid.append((pq, [dataclasses.replace(pq, ivf_nprobe=p) for p in nprobes if p <= nlist]))
    return grid


def index_name(d: int, n: int, cfg: IndexConfig) -> str:
    """The sweep's label of cfg: its factory string, with ' (L2 reduction)' when it searches through one."""
    return factory_string(d, n, cfg) + (L2_LABEL if uses_l2(cfg) else "")


def param_dict(cfg: IndexConfig, nlist: int | None) -> dict[str, int]:
    """cfg's search knobs as {'nprobe': 16} (parsed from the `ParameterSpace` string the index gets)."""
    params = search_parameters(cfg, nlist)
    return {k: int(v) for k, v in (p.split("=") for p in params.split(","))} if params else {}


def resolved(cfg: IndexConfig, n: int, d: int) -> dict:
    """cfg's fields with the automatic ones (nlist, pq_m, nprobe clamped to nlist) made explicit, so the
    setting rebuilds the same index whatever catalog size it is later built on."""
    if cfg.type in ("ivf", "ivfpq"):
        nlist = ivf_nlist(n, cfg)
        cfg = dataclasses.replace(cfg, ivf_nlist=nlist, ivf_nprobe=min(cfg.ivf_nprobe, nlist))
    if cfg.type == "ivfpq":
        cfg = dataclasses.replace(cfg, pq_m=pq_m(d, cfg))
    return dataclasses.asdict(cfg)


def sweep(xb: np.ndarray, xq: np.ndarray, grid: Iterable[tuple[IndexConfig, list[IndexConfig]]], k: int = 10,
          repeats: int = 2, build_threads: int | None = None, log=print) -> dict:
    """Build each structure of `grid` over xb (n, d) float32, search xq (nq, d) with each of its settings
    and measure recall@k against exact search and queries/s at FAISS's current thread count; building
    may use `build_threads` (a 1 M-item catalog builds much faster on every core, while queries/s is
    compared at the serving thread count)."""
    threads = faiss.omp_get_max_threads()
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    n, d = xb.shape
    _, gt = exact_knn(xb, xq, k)
    settings = []
    for structure, searches in grid:
        faiss.omp_set_num_threads(build_threads or threads)
        t0 = time.perf_counter()
        index = empty_index(d, structure, xb)
        index.add(xb)
        build_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(threads)
        ivf = faiss.try_extract_index_ivf(faiss_index(index))
        nlist = ivf.nlist if ivf is not None else None
        name = index_name(d, n, structure)
        for cfg in searches:
            set_search_parameters(index, cfg)
            I, qps = timed_search(index, xq, k, repeats)
            row = {"index": name, "params": param_dict(cfg, nlist), "config": resolved(cfg, n, d),
                   f"recall@{k}": recall_at_k(I, gt, k), "qps": qps,
                   "build_s": build_s}
            settings.append(row)
            log(f"{name:40s} {row['params']!s:32s} recall@{k} {row[f'recall@{k}']:.4f}  {qps:10.0f} q/s")
        del index
    flat_qps = max((s["qps"] for s in settings if s["config"]["type"] == "flat"), default=None)
    return {"items": n, "dim": d, "queries": len(xq), "k": k, "threads": threads, "build_threads": build_threads or threads,
            "flat_qps": flat_qps, "settings": settings}


def pick(settings: Sequence[dict], target: float, k: int = 10) -> dict | None:
    """The setting with the most queries/s among those whose recall@k reaches `target` (None if none
    does); on equal speed the higher recall wins."""
    ok = [s for s in settings if s[f"recall@{k}"] >= target]
    return max(ok, key=lambda s: (s["qps"], s[f"recall@{k}"]), default=None)


def recipe_fragment(setting: dict) -> dict:
    """An `index:` config fragment (for `--recipe`) that builds the chosen setting's index."""
    return {"index": dict(setting["config"])}


def plot_sweep(result: dict, path: str, k: int = 10) -> None:
    """Recall@k vs queries/s (log) per index structure, flat as a reference line, the choice circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = dict.fromkeys(s["index"] for s in result["settings"] if s["config"]["type"] != "flat")
    structures = list(dict.fromkeys(name.removesuffix(L2_LABEL) for name in names))
    for name in names:  # one colour per structure; dashed through the L2 reduction
        rows = [s for s in result["settings"] if s["index"] == name]
        colour = plt.cm.tab10(structures.index(name.removesuffix(L2_LABEL)) % 10)
        ax.plot([s[f"recall@{k}"] for s in rows], [s["qps"] for s in rows], "o--" if name.endswith(L2_LABEL) else "o-",
                ms=3, color=colour, label=name)
    if result.get("flat_qps"):
        ax.axhline(result["flat_qps"], color="k", ls="--", lw=1, label="flat (exact)")
    choice = result.get("choice")
    if choice:
        ax.plot(choice[f"recall@{k}"], choice["qps"], "o", ms=12, mfc="none", mec="r", label="choice")
    if result.get("target_recall"):
        ax.axvline(result["target_recall"], color="r", ls=":", lw=1)
    ax.set(yscale="log", xlabel=f"recall@{k} vs exact", ylabel=f"queries/s ({result['threads']} thread(s), batch)",
           title=f"{result['items']:,} items x {result['dim']} dims, {result['queries']:,} queries")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
