"""A serving process's memory over time with torch's oneDNN kernels on and off, side by side in one run
(llmkd/experiments/serving_memory.py): writes OUTPUT.json and OUTPUT.png.

    python scripts/benchmark_serving_memory.py runs/ml100k/bundle --seconds 300 --output results/serving_memory_cpu

Run it on an otherwise idle machine (the two settings share its cores).
"""

import json

from llmkd.commands.cli import run
from llmkd.experiments.serving_memory import run_benchmark


def main() -> None:
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (llmkd export)")
    p.add_argument("--seconds", type=float, default=300.0, help="how long each setting answers micro-batches")
    p.add_argument("--max-batch", type=int, default=32, help="micro-batches of 1 .. this many histories")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="results/serving_memory_cpu", help="path without suffix for .json and .png")
    args = p.parse_args()
    report = run_benchmark(args.bundle, args.seconds, Path(args.output), args.seed, args.max_batch)
    print(json.dumps({s: {k: v for k, v in r.items() if k != "series"} for s, r in report["settings"].items()},
                     indent=1))


if __name__ == "__main__":
    run(main)
