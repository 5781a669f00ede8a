"""Write a tiny random BERT teacher (hidden 32, 2 layers, the tests' size) with a WordPiece tokenizer over
the synthetic catalog's syllables, offline, to time the teacher stage where no model can be downloaded:

    python scripts/make_tiny_teacher.py --out runs/scale/tiny_bert
    python scripts/build_teacher.py --config configs/synthetic_scale.yaml --set teacher.model=runs/scale/tiny_bert
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmkd.commands.cli import run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from llmkd.experiments.scale import make_tiny_bert

    folder = make_tiny_bert(Path(args.out), args.seed, args.hidden, args.layers)
    print(f"tiny BERT teacher (hidden {args.hidden}, {args.layers} layers, random weights) -> {folder}")


if __name__ == "__main__":
    run(main)
