"""Micro-benchmarks of the catalog-size-bound steps (llmkd.experiments.scale_micro), each run in its own
process, results written after every run and reused on a rerun (resume after a kill; --fresh starts over):

    python scripts/benchmark_scale_micro.py softmax --items 2000 12000 50000 200000 --out results/softmax_cost_cpu.json
    python scripts/benchmark_scale_micro.py kd --items 100000 --kd-index flat ivf --out results/kd_candidates_cpu.json
    python scripts/benchmark_scale_micro.py kd --items 1000000 --out results/kd_candidates_cpu.json
    python scripts/benchmark_scale_micro.py eval --items 100000 1000000 --item-block 65536 1000000000 --out results/eval_blocked_cpu.json
    python scripts/benchmark_scale_micro.py index --items 100000 1000000 --index-type flat ivf hnsw --out results/index_build_cpu.json

softmax: seconds per training step and peak RSS of full vs sampled softmax (the default student, 64
windows x 50 positions) and of the sampled softmax with sparse item updates, ratios side by side. kd: KD candidate building (FAISS top-K over
the teacher's item vectors, seen items masked). eval: blocked evaluation of a two-tower scorer (an
item block at least the catalog size = one block per batch of users, the former memory). index: the
index stage's build from a student's item vectors.
"""

from __future__ import annotations

import argparse
import json

from llmkd.commands.cli import run


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["softmax", "kd", "eval", "index"])
    p.add_argument("--items", type=int, nargs="+", required=True, help="catalog sizes")
    p.add_argument("--out", required=True, help="results JSON (reused and extended on a rerun)")
    p.add_argument("--steps", type=int, default=3, help="softmax: timed steps after one warm-up")
    p.add_argument("--num-negatives", type=int, default=256, help="softmax: sampled negatives")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="kd: teacher rows (positions) per catalog size (default: as many as items)")
    p.add_argument("--teacher-dim", type=int, default=384, help="kd: teacher vector width (MiniLM: 384)")
    p.add_argument("--kd-index", nargs="+", default=["auto"], help="kd: distill.kd_index values to measure")
    p.add_argument("--recall-rows", type=int, default=256,
                   help="kd: rows whose candidates are checked against exact full scoring (after the peak RSS)")
    p.add_argument("--users", type=int, default=2048, help="eval: evaluated users (the cost per user is what grows)")
    p.add_argument("--item-block", type=int, nargs="+", default=[65536], help="eval: items scored per block")
    p.add_argument("--index-type", nargs="+", default=["flat"], help="index: index.type values")
    p.add_argument("--fresh", action="store_true",
                   help="start a new results file (the old one kept as <out>.prev) instead of reusing its runs")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    return p.parse_args()


def grid(args: argparse.Namespace) -> list[dict]:
    """The params of every run, in an order that puts the runs compared with each other side by side."""
    if args.kind == "softmax":
        base = {"steps": args.steps, "num_negatives": args.num_negatives}
        return [run for n in args.items for run in
                ({"n_items": n, "loss": "full_softmax", **base}, {"n_items": n, "loss": "sampled_softmax", **base},
                 {"n_items": n, "loss": "sampled_softmax", **base, "item_updates": "sparse"})]
    if args.kind == "kd":
        rows = args.rows or args.items
        if len(rows) != len(args.items):
            raise SystemExit("--rows: one value per --items value")
        return [{"n_items": n, "n_rows": m, "teacher_dim": args.teacher_dim, "kd_index": kind,
                 "recall_rows": args.recall_rows}
                for n, m in zip(args.items, rows) for kind in args.kd_index]
    if args.kind == "index":
        return [{"n_items": n, "index_type": t} for n in args.items for t in args.index_type]
    return [{"n_items": n, "n_users": args.users, "item_block": b} for n in args.items for b in args.item_block]


def main() -> None:
    from pathlib import Path

    from llmkd.experiments.scale_micro import run_grid, softmax_ratios, write_atomic

    args = arguments()
    result = run_grid(args.kind, grid(args), args.out, args.timeout, fresh=args.fresh)
    if args.kind == "softmax":
        result["ratios"] = softmax_ratios(result)
        write_atomic(Path(args.out), result)
        print(json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    run(main)
