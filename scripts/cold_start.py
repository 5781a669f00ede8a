"""Cold-start items: Recall@K on items withheld from every training stage (see llmkd/experiments/coldstart.py).

    python scripts/prepare_data.py --config configs/ml100k_cold.yaml      # withholds data.cold_items
    accelerate launch scripts/finetune_teacher.py --config configs/ml100k_cold.yaml
    python scripts/build_teacher.py --config configs/ml100k_cold.yaml
    accelerate launch scripts/distill.py --config configs/ml100k_cold.yaml
    python scripts/cold_start.py --config configs/ml100k_cold.yaml

Writes <out_dir>/cold_start/results.md and results.json.
"""

from llmkd.commands.cli import config_from, parser, run
from llmkd.experiments.coldstart import run_cold_start


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--student", "--students", dest="students", nargs="+", default=None,
                   help="student folders under out_dir (default: distill.name); each needs student.content_features")
    args = p.parse_args()
    cfg = config_from(args)
    result = run_cold_start(cfg, args.students or [cfg.distill.name])
    print(result["markdown"])


if __name__ == "__main__":
    run(main)
