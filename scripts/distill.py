"""Train the two-tower student with Accelerate: hard labels + alpha * KD on the teacher's scores.

    llmkd distill --config configs/ml100k.yaml
    llmkd distill --config configs/ml100k.yaml --set distill.alpha=0 --set distill.name=student_no_kd
    llmkd distill --config configs/ml100k.yaml --recipe runs/ml100k/tune/recipe.yaml

(`llmkd distill [accelerate launch options --] ...` launches this script through Accelerate and keeps a
user error to one line and exit status 2; `accelerate launch scripts/distill.py ...` works too.)

With --recipe (the overrides chosen on valid by scripts/tune.py), a search run trained with exactly these
settings on the same data and teacher cache is copied instead of trained again (--retrain to train anyway);
--reuse-from DIR adds the runs under DIR to those that may stand for this one.
"""

import os
from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.data import load_data
from llmkd.distill import train
from llmkd.infra.reuse import reuse, runs_in


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoints/<name>/last")
    p.add_argument("--retrain", action="store_true", help="train even if a finished run with the same settings exists")
    p.add_argument("--reuse-from", action="append", default=[], metavar="DIR",
                   help="a folder of finished runs (e.g. <out_dir>/seeds) that may stand for this run (repeatable)")
    args = p.parse_args()
    cfg = config_from(args)
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    folders = [*([Path(args.recipe).parent / "runs"] if args.recipe else []), *map(Path, args.reuse_from)]
    if folders and not args.retrain and single:
        data = load_data(Path(cfg.out_dir) / "data")
        if reuse(cfg, data.fingerprint, runs_in(folders), data.num_items):
            print(f"reused a finished run trained with the same settings -> {Path(cfg.out_dir) / cfg.distill.name}")
            return
    result = train(cfg, resume=args.resume)
    print(f"best valid ndcg@10 {result['best_valid_ndcg@10']:.4f} at epoch {result['best_epoch']}")


if __name__ == "__main__":
    run(main)
