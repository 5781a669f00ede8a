"""FLOPs and fraction of the machine's matrix peak for each heavy stage (llmkd.experiments.stage_efficiency):
LoRA step, teacher item and history encoding, student epoch (full and sampled softmax), validation.

    python scripts/benchmark_stage_efficiency.py --config configs/amazon_beauty.yaml \\
        --output results/stage_efficiency_cpu.json      # and results/stage_efficiency_cpu.png

Run it on an otherwise idle machine: the seconds are what the fractions are made of.
"""

import json
from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.experiments.scale_micro import environment
from llmkd.experiments.stage_efficiency import plot, stage_efficiency
from llmkd.infra.artifacts import write_json


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each stage's unit (median)")
    p.add_argument("--texts", type=int, default=256, help="teacher texts per unit")
    p.add_argument("--batches", type=int, default=8, help="student training steps per unit")
    p.add_argument("--output", type=Path, required=True, help="results JSON (a .png of the same name beside it)")
    args = p.parse_args()
    cfg = config_from(args)
    result = {"config": args.config, "env": environment(),
              **stage_efficiency(cfg, args.reps, args.threads, args.texts, args.batches)}
    write_json(args.output, result)
    plot(result, args.output.with_suffix(".png"))
    print(json.dumps({s: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                      for s, r in result["stages"].items()}, indent=1))
    print(f"peak {result['peak_gflops']:.1f} GFLOP/s; furthest from its bound: {result['furthest_from_bound']}")


if __name__ == "__main__":
    run(main)
