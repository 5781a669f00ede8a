"""Seconds per training step of the configured student on its own data for each `distill.length_groups`
value, side by side in one process (llmkd.experiments.student_step); ratios, not seconds, compare across runs.

    python scripts/benchmark_student_step.py --config configs/amazon_beauty.yaml --groups 1 2 4 8 \\
        --output results/student_step_cpu.json
"""

import json
from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.experiments.scale_micro import environment
from llmkd.experiments.student_step import student_step_cost
from llmkd.infra.artifacts import write_json


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8], help="length_groups values (first = baseline)")
    p.add_argument("--batches", type=int, default=8, help="training batches timed per setting and repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions, each timing every setting in turn")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--output", type=Path, required=True, help="results JSON")
    args = p.parse_args()
    cfg = config_from(args)
    result = {"config": args.config, "env": environment(),
              **student_step_cost(cfg, args.groups, args.batches, args.reps, args.threads)}
    write_json(args.output, result)
    print(json.dumps(result["settings"], indent=1))


if __name__ == "__main__":
    run(main)
