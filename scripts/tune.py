"""Recipe search: which distillation works on this dataset, chosen on valid within a wall-clock budget.

    python scripts/tune.py --config configs/amazon_beauty.yaml --budget 3600 --jobs 2
    python scripts/tune.py --config configs/amazon_beauty.yaml --prune      # stop losing candidates early (ASHA)
    python scripts/tune.py --config configs/ml100k.yaml --families content_features user_align --budget 600
    accelerate launch scripts/distill.py --config configs/ml100k.yaml --recipe runs/ml100k/tune/recipe.yaml

Needs <out_dir>/data and the teacher cache (scripts/prepare_data.py, scripts/build_teacher.py). Writes
<out_dir>/tune/recipe.yaml (the chosen overrides), report.md, report.json and search.png; runs land in
<out_dir>/tune/runs/ and are reused on a rerun (an interrupted run resumes from its checkpoint). With --prune,
a candidate that falls behind the candidates before it at 5, 15, 45, ... epochs is stopped there and never
chosen (llmkd.distill.pruning: Optuna's successive halving; the study in <out_dir>/tune/pruning.journal).
"""

import copy
from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.distill.pruning import add_prune_options, pruning_from
from llmkd.distill.recipe import FAMILIES, run_search
from llmkd.infra.artifacts import LlmkdError


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget: no new run starts once it would overrun (default: no limit)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), help=f"subset of: {', '.join(FAMILIES)}")
    p.add_argument("--jobs", type=int, default=1, help="students trained at a time (worker processes share the cores)")
    p.add_argument("--seed", type=int, default=None, help="seed of the search runs (default: distill.seed)")
    p.add_argument("--configured-twin", action="store_true",
                   help="skip the twin stage: the no-teacher student at the configured settings only "
                        "(llmkd.distill.recipe.twin_points)")
    add_prune_options(p)
    args = p.parse_args()
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        raise LlmkdError(f"--families: unknown {unknown}; known: {', '.join(FAMILIES)}")
    if args.budget is not None and args.budget <= 0:
        raise LlmkdError(f"--budget: expected seconds > 0, got {args.budget}")
    if args.jobs < 1:
        raise LlmkdError(f"--jobs: expected >= 1, got {args.jobs}")
    cfg = config_from(args)
    families = {f: copy.deepcopy(FAMILIES[f]) for f in args.families}
    pruning = pruning_from(args, Path(cfg.out_dir) / "tune" / "pruning.journal")
    report = run_search(cfg, families, args.budget, args.jobs, args.seed,
                        twins={"": []} if args.configured_twin else None, pruning=pruning)
    best = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    print(f"chosen on valid: {report['chosen']} (valid ndcg@10 {best['valid_ndcg@10']:.4f}) in {report['elapsed_s']:.0f} s "
          f"-> {cfg.out_dir}/tune/recipe.yaml ({report['why']})")


if __name__ == "__main__":
    run(main)
