"""Faults of `llmkd serve` through real server processes: reload under load, a corrupted bundle, overload,
the cost of /metrics, a drain on SIGTERM (llmkd/experiments/service_faults.py).

    python scripts/benchmark_service_faults.py bundles/ml100k --output results/serving_faults_cpu.json

The bundle is copied to a temporary folder (a second version and a corrupted copy are made beside it); the
servers listen on loopback. Writes --output; --note is stored in it (say what else ran on the machine).
"""

import argparse
import json
import os
from pathlib import Path

from llmkd.commands.cli import run
from llmkd.experiments.service_faults import measure_service_faults
from llmkd.infra.artifacts import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (llmkd export)")
    p.add_argument("--seconds", type=float, default=6.0, help="length of the reload and drain runs (others scale)")
    p.add_argument("--note", default="", help="what the machine was doing meanwhile, stored in the JSON")
    p.add_argument("--output", default="results/serving_faults_cpu.json")
    args = p.parse_args()
    result = {"machine": {"cpus": os.cpu_count(), "note": args.note}, **measure_service_faults(args.bundle, args.seconds)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    short = {k: result[k] for k in ("reload_under_load", "corrupt_bundle", "drain")}
    print(json.dumps({"overload": {k: v for k, v in result["overload"].items() if k != "series"},
                      "metrics_overhead": result["metrics_overhead"]["mean"], **short}, indent=1, default=str))
    print(f"-> {out}")


if __name__ == "__main__":
    run(main)
