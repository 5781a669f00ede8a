"""Micro-benchmarks of the steps that grow with the catalog: the hard-label loss (full vs sampled
softmax), KD candidate building (teacher top-K), blocked evaluation and index building, at chosen sizes.

Each measurement runs in a fresh Python process (`python -m llmkd.experiments.scale_micro KIND JSON`).
`base_rss_gib` is the RSS once the inputs are built; the peak count then restarts there (`reset_peak`,
`peak_since_base`), so `peak_rss_gib` is the measured step's peak (inputs included), not the input
generation's. Results are appended to a JSON file after every run; a run already there is reused, so a
killed benchmark resumes where it stopped. Timings on a shared machine are only comparable side by side
(ratios within one invocation), never against numbers taken at another time.

    {"kind": "softmax", "runs": [{"params": {...}, "step_s": ..., "peak_rss_gib": ..., ...}], "env": {...}}
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

GIB = 1024 ** 3


def rss_gib() -> float:
    """Current resident set size of this process in GiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def peak_rss_gib() -> float:
    """Peak resident set size in GiB since `reset_peak` (Linux VmHWM), else since the process started."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def reset_peak() -> bool:
    """Restart the peak RSS count at the current RSS (Linux: '5' to /proc/self/clear_refs), so the peak
    reported is the measured step's, not the input generation's; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def zipf_counts(n: int, seed: int, a: float = 1.0) -> np.ndarray:
    """(n,) float64 power-law item popularity (rank^-a), shuffled over item ids."""
    counts = 1.0 / np.arange(1, n + 1) ** a
    return np.random.default_rng(seed).permutation(counts) * 1e6


def softmax_cost(n_items: int, loss: str, steps: int = 3, batch: int = 64, max_len: int = 50,
                 num_negatives: int = 256, dim: int = 64, seed: int = 0, item_updates: str = "dense") -> dict:
    """Seconds per optimizer step (forward, hard loss, backward, optimizer) of the default transformer student
    on `batch` full windows of `max_len` positions over `n_items` items; the first step is a warm-up.
    `item_updates` 'sparse': the item rows looked up per step, SparseAdam on them (`distill.item_updates`)."""
    import torch

    from llmkd.distill import hard_loss, make_optimizers
    from llmkd.infra.config import StudentConfig
    from llmkd.student import TwoTower

    torch.manual_seed(seed)
    model = TwoTower.from_config(StudentConfig(dim=dim), n_items, max_len, num_users=0)
    sparse = item_updates == "sparse"
    opts = make_optimizers(model, torch.nn.Module(), SimpleNamespace(lr=1e-3, weight_decay=0.0), sparse)
    counts = torch.as_tensor(zipf_counts(n_items, seed), dtype=torch.float32) + 1
    log_q = (counts / counts.sum()).log()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, n_items, (batch, max_len), generator=g)
    y = torch.randint(0, n_items, (batch, max_len), generator=g)
    cfg = SimpleNamespace(loss=loss, num_negatives=num_negatives)
    base, reset = rss_gib(), reset_peak()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        states, items = model(x, rows=sparse)
        value = hard_loss(states, items, y, cfg, log_q, generator=g)
        value.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return {"step_s": float(np.median(times[1:])), "step_times": times, "base_rss_gib": base,
            "peak_since_base": reset,
            "logits_gib": batch * max_len * (n_items if loss == "full_softmax" else num_negatives + 1) * 4 / GIB}


def random_histories(n_users: int, n_items: int, mean_len: float, seed: int) -> list[np.ndarray]:
    """n_users histories of geometric length (>= 1, mean ~mean_len) over power-law popular items."""
    rng = np.random.default_rng(seed)
    lens = rng.geometric(1 / mean_len, n_users)
    p = zipf_counts(n_items, seed)
    items = rng.choice(n_items, size=int(lens.sum()), p=p / p.sum())
    return np.split(items.astype(np.int64), np.cumsum(lens)[:-1])


def exact_recall(kd, rows: np.ndarray, chunk: int = 64) -> float:
    """Recall of kd's candidate sets against the exact top-K unseen items (full scoring) for `rows`."""
    import torch

    hits = total = 0
    for start in range(0, len(rows), chunk):
        r = torch.as_tensor(rows[start : start + chunk])
        full = (kd.user_at(r) @ kd.items.T).masked_fill(kd.seen(r), float("-inf"))  # (C, N)
        top = torch.topk(full, kd.k, dim=1)
        for ids, vals, got, got_scores in zip(top.indices, top.values, kd.top_ids[r], kd.top_scores[r]):
            want = set(ids[torch.isfinite(vals)].tolist())
            hits += len(want & set(got[torch.isfinite(got_scores)].tolist()))
            total += len(want)
    return hits / max(total, 1)


def kd_cost(n_items: int, n_rows: int, teacher_dim: int = 384, kd_index: str = "auto", k: int = 100,
            mean_history: float = 10.0, recall_rows: int = 0, seed: int = 0) -> dict:
    """Seconds and memory of building KD candidates (`KDTargets`: FAISS top-K over the teacher's item
    vectors, seen items masked) for n_rows teacher positions (one per user, its 'kd' cut) over a
    clustered n_items x teacher_dim catalog (float16 user vectors, as the cache stores them); then,
    after the peak RSS is read (the one reported), their recall against exact full scoring on
    `recall_rows` random rows."""
    import torch

    from llmkd.distill.kd_targets import KDTargets
    from llmkd.evaluation.ann import clustered_vectors
    from llmkd.infra.config import DistillConfig

    train = [h for h in random_histories(n_rows, n_items, mean_history, seed)]
    train = [np.append(h, h[:1]) if len(h) < 2 else h for h in train]  # a kd cut needs >= 2 train items
    vec = clustered_vectors(n_items + n_rows, teacher_dim, max(1, n_items // 100), seed)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    arrays = {"item_emb": torch.as_tensor(vec[:n_items].copy()), "user_pos": torch.as_tensor(vec[n_items:]).half(),
              "pos_user": torch.arange(n_rows), "pos_cut": torch.as_tensor([len(h) - 1 for h in train])}
    del vec
    cache = SimpleNamespace(arrays=arrays, item_emb=arrays["item_emb"], folder="synthetic")
    search = DistillConfig(kd_index=kd_index).kd_index_for(n_items)
    base, reset = rss_gib(), reset_peak()
    t0 = time.perf_counter()
    kd = KDTargets(cache, train, k, 20.0, torch.device("cpu"), search)
    seconds, peak = time.perf_counter() - t0, peak_rss_gib()
    rows = np.random.default_rng(seed).choice(n_rows, min(recall_rows, n_rows), replace=False)
    return {"kd_s": seconds, "search": search, "base_rss_gib": base, "peak_since_base": reset,
            "peak_rss_gib": peak,
            "recall_vs_exact": exact_recall(kd, rows) if len(rows) else None, "recall_rows": len(rows),
            "candidates_gib": (kd.top_ids.nbytes + kd.top_scores.nbytes) / GIB,
            "interactions": int(sum(len(h) for h in train)),
            "dense_rows_x_items_gib": n_rows * n_items * 4 / GIB}


def eval_cost(n_items: int, n_users: int = 2048, item_block: int = 65536, dim: int = 64, batch_size: int = 256,
              mean_history: float = 10.0, seed: int = 0) -> dict:
    """Seconds and memory of `evaluate_scores` of a two-tower scorer (`DotScorer`, random vectors) over
    n_users test users and n_items items, read item_block items at a time."""
    import torch

    from llmkd.data import RecData
    from llmkd.evaluation.metrics import DotScorer, evaluate_scores

    hists = random_histories(n_users, n_items, mean_history + 2, seed)
    hists = [np.concatenate([h, np.random.default_rng(u).integers(0, n_items, 2)]) if len(h) < 3 else h
             for u, h in enumerate(hists)]
    data = RecData(user_ids=[str(u) for u in range(n_users)], item_ids=[str(i) for i in range(n_items)],
                   item_texts=[""] * n_items, train=[h[:-2] for h in hists],
                   valid_item=np.array([h[-2] for h in hists]), test_item=np.array([h[-1] for h in hists]),
                   fingerprint="synthetic")
    g = torch.Generator().manual_seed(seed)
    users, items = torch.randn(n_users, dim, generator=g), torch.randn(n_items, dim, generator=g)
    scorer = DotScorer(lambda us, split: users[torch.as_tensor(us)], items)
    base, reset = rss_gib(), reset_peak()
    t0 = time.perf_counter()
    m = evaluate_scores(data, "test", scorer, (10,), batch_size, item_block=item_block)
    return {"eval_s": time.perf_counter() - t0, "users_per_s": n_users / (time.perf_counter() - t0),
            "base_rss_gib": base, "peak_since_base": reset, "ndcg@10": float(m["ndcg@10"].mean()),
            "score_block_gib": batch_size * min(item_block, n_items) * 4 / GIB}


def index_cost(n_items: int, index_type: str = "flat", dim: int = 64, seed: int = 0) -> dict:
    """Seconds and memory of the index stage's work: a student's item vectors -> `build_index`."""
    import torch

    from llmkd.index import build_index
    from llmkd.infra.config import IndexConfig, StudentConfig
    from llmkd.student import TwoTower

    torch.manual_seed(seed)
    model = TwoTower.from_config(StudentConfig(dim=dim), n_items, 50, num_users=0)
    base, reset = rss_gib(), reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        index = build_index(model.item_vectors().numpy(), IndexConfig(type=index_type))
    return {"index_s": time.perf_counter() - t0, "base_rss_gib": base, "peak_since_base": reset,
            "ntotal": int(index.ntotal),
            "vectors_gib": n_items * dim * 4 / GIB}


KINDS = {"softmax": softmax_cost, "kd": kd_cost, "eval": eval_cost, "index": index_cost}


def measure(kind: str, params: dict) -> dict:
    """Run one measurement in this process and add its peak RSS."""
    t0 = time.perf_counter()
    out = KINDS[kind](**params)
    return {"params": params, "peak_rss_gib": peak_rss_gib(), **out, "wall_s": time.perf_counter() - t0}


def isolated(kind: str, params: dict, timeout: float | None = None) -> dict:
    """`measure` in a fresh interpreter (peak RSS of that run alone); an error is recorded, not raised."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "llmkd.experiments.scale_micro", kind, json.dumps(params)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"params": params, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"params": params, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1],
                "returncode": proc.returncode}
    return json.loads(lines[-1])


def write_atomic(path: Path, obj: dict) -> None:
    """Write JSON to `path` through a temporary file and a rename: a kill leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def environment() -> dict:
    """Where the numbers were taken: cores, load average when the run started."""
    return {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "python": sys.version.split()[0]}


def run_grid(kind: str, grid: Sequence[dict], out: str | Path, timeout: float | None = None, log=print,
             fresh: bool = False) -> dict:
    """Measure every params dict of `grid` (each in its own process), writing `out` after each run and
    reusing runs already in it (same kind and params, no error); `fresh` first moves an existing `out`
    to `<out>.prev` (a new measurement, e.g. on an idle machine)."""
    out = Path(out)
    if fresh and out.is_file():
        os.replace(out, out.with_name(out.name + ".prev"))
    result = json.loads(out.read_text()) if out.is_file() else {"kind": kind, "runs": []}
    if result.get("kind") != kind:
        raise SystemExit(f"{out}: holds '{result.get('kind')}' results, not '{kind}'; choose another --out")
    result.setdefault("env", environment())
    done = {json.dumps(r["params"], sort_keys=True) for r in result["runs"] if "error" not in r}
    result["runs"] = [r for r in result["runs"] if "error" not in r]
    for params in grid:
        key = json.dumps(params, sort_keys=True)
        if key in done:
            log(f"reused {kind} {params}")
            continue
        row = isolated(kind, params, timeout)
        result["runs"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, result)
        log(f"{kind} {params}: " + (row["error"] if "error" in row else
                                     f"{row.get('step_s', row['wall_s']):.3f} s, peak RSS {row['peak_rss_gib']:.2f} GiB "
                                     f"(inputs {row['base_rss_gib']:.2f} GiB)"))
    return result


def softmax_ratios(result: dict) -> list[dict]:
    """Per catalog size: full / sampled step time and peak RSS, from runs of the same invocation."""
    by = {}
    for r in result["runs"]:
        if "error" not in r:
            kind = r["params"]["loss"] + ("+sparse" if r["params"].get("item_updates") == "sparse" else "")
            by.setdefault(r["params"]["n_items"], {})[kind] = r
    rows = []
    for n, pair in sorted(by.items()):
        if {"full_softmax", "sampled_softmax"} <= set(pair):
            f, s = pair["full_softmax"], pair["sampled_softmax"]
            row = {"n_items": n, "full_step_s": f["step_s"], "sampled_step_s": s["step_s"],
                   "time_ratio_full_over_sampled": f["step_s"] / s["step_s"],
                   "full_peak_rss_gib": f["peak_rss_gib"], "sampled_peak_rss_gib": s["peak_rss_gib"],
                   "full_extra_rss_gib": f["peak_rss_gib"] - f["base_rss_gib"],
                   "sampled_extra_rss_gib": s["peak_rss_gib"] - s["base_rss_gib"]}
            if "sampled_softmax+sparse" in pair:
                sp = pair["sampled_softmax+sparse"]
                row.update(sparse_step_s=sp["step_s"], time_ratio_dense_over_sparse=s["step_s"] / sp["step_s"])
            rows.append(row)
    return rows


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], json.loads(sys.argv[2]))))
