"""Cost growth of every stage (issue 14): wall time and peak RSS at 10 k, 100 k and 1 M items, each stage a
process of its own through its real script, on the synthetic catalog (generated once per size) with the
tiny random BERT teacher (made offline when missing). Results go to --output as each stage finishes; a
rerun reuses finished stages and resumes after a kill. `make benchmark-scale` runs the default:

    python scripts/benchmark_scale.py --config configs/synthetic_scale.yaml --output results/scale_cpu.json
    python scripts/benchmark_scale.py --sizes 10k:10k:100k 100k:100k:1m --output runs/scale/small.json
    python scripts/benchmark_scale.py --set distill.epochs=2 --output runs/scale/two_epochs.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmkd.commands.cli import run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/synthetic_scale.yaml", help="stage settings (data paths, out_dir and "
                   "teacher.model are set per size)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field for every stage (repeatable)")
    p.add_argument("--sizes", nargs="+", default=["10k:10k:100k", "100k:100k:1m", "1m:1m:10m"],
                   metavar="ITEMS:USERS:INTERACTIONS")
    p.add_argument("--root", default="runs/scale", help="synthetic catalogs and stage artifacts, one folder per size")
    p.add_argument("--teacher", default=None, help="teacher model folder (default <root>/tiny_bert, made if missing) "
                   "or a packaged model name (minilm: the real teacher's encoding cost)")
    p.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help="run only the first stages (e.g. data teacher); default: data teacher distill index eval")
    p.add_argument("--seed", type=int, default=0, help="synthetic catalog seed")
    p.add_argument("--stage-timeout", type=float, default=4 * 3600, help="seconds before a stage is killed and "
                   "recorded as timed out")
    p.add_argument("--retry-failed", action="store_true", help="run stages recorded as failed again")
    p.add_argument("--output", default="results/scale_cpu.json")
    args = p.parse_args()
    from llmkd.experiments.scale import STAGES, Size, benchmark, plot, table

    root = Path(args.root)
    output = Path(args.output)
    results = benchmark(Path(args.config), output, root, [Size.parse(s) for s in args.sizes],
                        Path(args.teacher) if args.teacher else root / "tiny_bert", args.seed, args.stage_timeout,
                        args.overrides, args.retry_failed, tuple(args.stages) if args.stages else STAGES)
    plot(results, output.with_suffix(".png"))
    output.with_suffix(".md").write_text(table(results), encoding="utf-8")
    print(table(results))
    print(f"-> {output}, {output.with_suffix('.png')}, {output.with_suffix('.md')}")


if __name__ == "__main__":
    run(main)
