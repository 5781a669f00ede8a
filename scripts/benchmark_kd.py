"""Which distillation lifts the student: no-KD vs every KD variant, chosen on valid, over seeds.

    python scripts/benchmark_kd.py --config configs/ml100k_lora_long.yaml --seeds 0 1 2
    python scripts/benchmark_kd.py --config ... --families listwise_kl content_features --grid listwise_kl:distill.alpha=0.1,0.3,1
    python scripts/benchmark_kd.py --config configs/amazon_beauty.yaml --target 1.25 1.40 --peer "ActionPiece (ICML 2025)=0.0424"

Writes <out_dir>/kd_benchmark/summary/results.md (search, table, targets, diagnostics), results.json and
seeds.png; the valid search is the recipe search (llmkd.distill.recipe, runs in <out_dir>/kd_benchmark/search/runs/),
the seeds land in <out_dir>/seeds/; every finished student is reused on a rerun.
"""

import copy
from pathlib import Path

import yaml

from llmkd.commands.cli import config_from, parser, run
from llmkd.distill.pruning import add_prune_options, pruning_from
from llmkd.experiments.kd_benchmark import FAMILIES, run_kd_benchmark
from llmkd.infra.artifacts import LlmkdError


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--search-seed", type=int, default=None, help="seed of the valid search (default: the first seed)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), help=f"subset of: {', '.join(FAMILIES)}")
    p.add_argument("--jobs", type=int, default=1, help="students trained at a time (worker processes share the cores)")
    p.add_argument("--grid", action="append", default=[], metavar="FAMILY:KEY=V1,V2",
                   help="replace one key of a family's search grid (values parsed as YAML)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS", help="wall-clock budget of the search")
    p.add_argument("--target", type=float, nargs=2, default=[1.10, 1.20], metavar=("RATIO", "STRETCH"),
                   help="lift of the valid-chosen variant over no-KD to check (test NDCG@10)")
    p.add_argument("--peer", default="SASRec (RecBole, docs/peers.md)=0.0959", metavar="NAME=NDCG",
                   help="a published test NDCG@10 to compare with")
    p.add_argument("--configured-twin", action="store_true",
                   help="skip the twin stage: the no-teacher student at the configured settings only "
                        "(llmkd.distill.recipe.twin_points)")
    add_prune_options(p)
    args = p.parse_args()
    name, _, value = args.peer.rpartition("=")
    try:
        peer = (name, float(value))
    except ValueError:
        raise LlmkdError(f"--peer {args.peer!r}: expected NAME=NDCG, e.g. 'SASRec=0.0318'") from None
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        raise LlmkdError(f"--families: unknown {unknown}; known: {', '.join(FAMILIES)}")
    families = {f: copy.deepcopy(FAMILIES[f]) for f in args.families}
    for g in args.grid:
        family, _, rest = g.partition(":")
        key, _, values = rest.partition("=")
        if family not in families or not key or not values:
            raise LlmkdError(f"--grid {g!r}: expected FAMILY:KEY=V1,V2 with FAMILY among {', '.join(families)}")
        families[family][1][key] = [yaml.safe_load(v) for v in values.split(",")]
    cfg = config_from(args)
    pruning = pruning_from(args, Path(cfg.out_dir) / "kd_benchmark" / "search" / "pruning.journal")
    result = run_kd_benchmark(cfg, args.seeds, families, args.search_seed, peer, args.jobs, args.budget,
                              tuple(args.target), twins={"": []} if args.configured_twin else None, pruning=pruning)
    print(result["markdown"])
    print(f"\nwritten to {result['folder']}")


if __name__ == "__main__":
    run(main)
