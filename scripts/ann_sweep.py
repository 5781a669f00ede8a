"""Sweep FAISS index types and search settings over item vectors: recall@10 against exact search and
queries/s for each, a recall-QPS plot, and the fastest setting that reaches --target-recall, written
as an `index:` fragment for `scripts/build_index.py --recipe`.

    python scripts/ann_sweep.py --synthetic 100000 --dim 64 --out results/ann_sweep_cpu.json
    python scripts/ann_sweep.py --xb items.npy --xq queries.npy --out results/ann_sweep_cpu.json
    python scripts/ann_sweep.py --config configs/ml100k.yaml --student student_kd --out runs/ml100k/ann_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import yaml

from llmkd.commands.cli import run
from llmkd.infra.artifacts import LlmkdError


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", type=int, metavar="N",
                     help="N clustered random item vectors (llmkd.evaluation.ann)")
    src.add_argument("--xb", help="item vectors, (n, d) float32 .npy")
    src.add_argument("--config", help="a run's config: its student's item vectors, valid users' vectors as queries")
    p.add_argument("--student", default="student_kd", help="with --config: student folder under out_dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --config: override a config field")
    p.add_argument("--xq", help="query vectors (n_q, d) .npy (with --xb); default: held-out synthetic points")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=None, help="synthetic clusters (default n / 100)")
    p.add_argument("--spread", type=float, default=1.0,
                   help="synthetic noise around each cluster centre (centres ~ N(0, 1)); larger = harder")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads while searching (queries/s)")
    p.add_argument("--build-threads", type=int, default=None, help="FAISS threads while building (default --threads)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best counts)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--nprobe", type=int, nargs="+", default=None)
    p.add_argument("--ef-search", type=int, nargs="+", default=None)
    p.add_argument("--pq-m", type=int, nargs="+", default=None)
    p.add_argument("--pq-refine", type=int, nargs="+", default=[0], help="IVF-PQ re-rank factors (0 = none)")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--out", default="results/ann_sweep_cpu.json")
    p.add_argument("--plot", default=None, help="default: --out with .png")
    p.add_argument("--recipe-out", default=None, help="index fragment (default: --out with _index.yaml)")
    return p.parse_args()


def vectors(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(xb, xq) float32 from the files, or synthetic clustered points (queries drawn from the same
    clusters but not in the catalog)."""
    from llmkd.evaluation.ann import clustered_vectors

    if args.synthetic is not None:
        clusters = args.clusters or max(1, args.synthetic // 100)
        x = clustered_vectors(args.synthetic + args.queries, args.dim, clusters, args.seed, args.spread)
        return x[: args.synthetic], x[args.synthetic :]
    if args.config is not None:
        from llmkd.evaluation.ann import student_vectors
        from llmkd.infra.config import load_config

        return student_vectors(load_config(args.config, args.overrides).out_dir, args.student, args.queries, args.seed)
    xb = np.load(args.xb).astype(np.float32)
    if args.xq is None:
        raise LlmkdError("--xb needs --xq (the query vectors, e.g. the student's user vectors)")
    xq = np.load(args.xq).astype(np.float32)
    if xb.ndim != 2 or xq.ndim != 2 or xb.shape[1] != xq.shape[1]:
        raise LlmkdError(f"--xb {xb.shape} and --xq {xq.shape} must be 2-d with the same width")
    return xb, xq[: args.queries]


def main() -> None:
    args = arguments()
    import faiss

    from llmkd.evaluation.ann import EF_SEARCHES, NPROBES, PQ_MS, default_grid, pick, plot_sweep, recipe_fragment, sweep

    faiss.omp_set_num_threads(args.threads)
    xb, xq = vectors(args)
    grid = default_grid(len(xb), xb.shape[1], args.hnsw_m, args.pq_m or PQ_MS, args.nprobe or NPROBES,
                        args.ef_search or EF_SEARCHES, args.pq_refine)
    result = sweep(xb, xq, grid, k=args.k, repeats=args.repeats, build_threads=args.build_threads)
    result["target_recall"] = args.target_recall
    result["choice"] = pick(result["settings"], args.target_recall, args.k)
    result["cpu_count"] = os.cpu_count()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot_sweep(result, str(plot), args.k)
    choice = result["choice"]
    if choice is None:
        print(f"no setting reaches recall@{args.k} {args.target_recall}; wrote {out}, {plot}")
        return
    fragment = Path(args.recipe_out) if args.recipe_out else out.with_name(out.stem + "_index.yaml")
    fragment.write_text(f"# scripts/ann_sweep.py: fastest setting with recall@{args.k} >= {args.target_recall} "
                        f"on {result['items']} items ({choice['qps'] / result['flat_qps']:.1f}x flat)\n"
                        + yaml.safe_dump(recipe_fragment(choice), sort_keys=False), encoding="utf-8")
    print(f"choice: {choice['index']} {choice['params']} recall@{args.k} {choice[f'recall@{args.k}']:.4f} "
          f"{choice['qps']:.0f} q/s = {choice['qps'] / result['flat_qps']:.1f}x flat; "
          f"wrote {out}, {plot}, {fragment} (use: scripts/build_index.py --recipe {fragment})")


if __name__ == "__main__":
    run(main)
