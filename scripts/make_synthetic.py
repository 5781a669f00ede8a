"""Write a synthetic catalog whose item text carries real signal (topics, drifting users, power-law
popularity; `llmkd.data.synthetic`) as bring-your-own-data Parquet files plus a config for the data stage:

    python scripts/make_synthetic.py --items 100000 --users 100000 --interactions 1000000 --seed 0 --out data/syn100k
    python scripts/prepare_data.py --config data/syn100k/config.yaml
"""

from __future__ import annotations

import argparse

from llmkd.commands.cli import run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, required=True)
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--interactions", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for the files")
    p.add_argument("--topics", type=int, default=None, help="latent topics (default sqrt(items) / 2)")
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent: rank r has weight r^-zipf")
    p.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows generated and written at a time")
    args = p.parse_args()
    from llmkd.data.synthetic import SyntheticSpec, write_synthetic

    spec = SyntheticSpec(args.items, args.users, args.interactions, args.seed, topics=args.topics,
                         zipf=args.zipf, chunk_rows=args.chunk_rows)
    meta = write_synthetic(spec, args.out)
    print(f"{spec.items} items ({spec.topics} topics), {spec.users} users, {spec.interactions} interactions -> "
          f"{args.out} in {sum(meta['seconds'].values()):.1f} s; data stage: "
          f"python scripts/prepare_data.py --config {args.out}/config.yaml")


if __name__ == "__main__":
    run(main)
