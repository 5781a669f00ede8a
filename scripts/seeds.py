"""Train the no-KD and KD students over several seeds and report mean ± std and paired intervals.

    python scripts/seeds.py --config configs/ml100k.yaml --seeds 0 1 2
    python scripts/seeds.py --config configs/ml100k.yaml --variant kd_t2:distill.temperature=2
    python scripts/seeds.py --config configs/ml100k.yaml --skip-default-kd --variant kd_b:distill.teacher=teacher_b
    python scripts/seeds.py --config configs/ml100k.yaml --recipe runs/ml100k/tune/recipe.yaml   # student_kd = the recipe
    python scripts/seeds.py --config configs/ml100k.yaml --seeds 0 --reuse-from runs/ml100k   # report finished runs

The no-KD twin never uses the teacher (no KD, no alignment, no teacher item features), whatever the
config or recipe says; with --recipe the search's runs are reused where their settings match.
"""

from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.experiments.seeds import DEFAULT_VARIANTS, run_seeds
from llmkd.infra.artifacts import LlmkdError


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="an extra student variant (added after the defaults; each is compared with student_no_kd)")
    p.add_argument("--skip-default-kd", action="store_true",
                   help="run only student_no_kd and the --variant students (not the config's own student_kd)")
    p.add_argument("--jobs", type=int, default=1, help="students trained at a time (worker processes share the cores)")
    p.add_argument("--reuse-from", nargs="+", type=Path, default=[], metavar="DIR",
                   help="folders whose run folders may already hold a variant's run (matched on its training inputs)")
    args = p.parse_args()
    variants = dict(DEFAULT_VARIANTS)
    if args.skip_default_kd:
        del variants["student_kd"]
    for v in args.variant:
        name, _, rest = v.partition(":")
        if not name:
            raise LlmkdError(f"--variant {v!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
        variants[name] = [x for x in rest.split(",") if x]
    cfg = config_from(args)
    reuse_from = [*([Path(args.recipe).parent / "runs"] if args.recipe else []), *args.reuse_from]
    if args.jobs < 1:
        raise LlmkdError(f"--jobs: expected >= 1, got {args.jobs}")
    result = run_seeds(cfg, args.seeds, variants, reuse_from=reuse_from, jobs=args.jobs)
    print(result["markdown"])
    print(f"\nwritten to {Path(cfg.out_dir) / 'seeds_report'}")


if __name__ == "__main__":
    run(main)
