"""1 vs N processes on this machine for teacher encoding, LoRA tuning steps and distillation epochs, and a
cost model (an estimate) for 8 GPUs and 2 machines x 8 GPUs; writes OUTPUT.json and OUTPUT.md.

    python scripts/benchmark_processes.py --config configs/ml100k.yaml --set out_dir=runs/processes \\
        --output results/processes_cpu

Finished measurements in OUTPUT.json are reused: a killed run resumes at the next one (delete the file, or
one of its "runs" entries, to measure again). Run it on an otherwise idle machine.
"""

import os
from pathlib import Path

from llmkd.commands.cli import parser, run
from llmkd.experiments.processes import STAGES, Cluster, Workload, run_benchmark


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--output", default="results/processes_cpu", help="path without suffix for .json and .md")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the processes share")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--shard-size", type=int, default=256, help="teacher.shard_size (shards are split between processes)")
    p.add_argument("--steps", type=int, default=30, help="LoRA steps measured (one evaluation before, one after)")
    p.add_argument("--batch-size", type=int, default=32, help="LoRA histories per step and process")
    p.add_argument("--cache-pairs", type=int, default=2000, help="finetune.cache_pairs (the one-off lower-layer cache)")
    p.add_argument("--epochs", type=int, default=2, help="distillation epochs measured")
    for field, default in vars(Cluster()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=float, default=default, help="cost model assumption")
    for field, default in vars(Workload()).items():
        p.add_argument(f"--project-{field.replace('_', '-')}", type=int, default=default, help="projected workload")
    args = p.parse_args()
    cluster = Cluster(**{f: getattr(args, f) for f in vars(Cluster())})
    workload = Workload(**{f: getattr(args, f"project_{f}") for f in vars(Workload())})
    run_benchmark(args, cluster, workload)
    print(Path(f"{args.output}.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    run(main)
