"""Train the two-tower student with Accelerate: hard labels + alpha * KD on the teacher's scores.

    accelerate launch scripts/distill.py --config configs/ml100k.yaml
    accelerate launch scripts/distill.py --config configs/ml100k.yaml --set distill.alpha=0 --set distill.name=student_no_kd
"""

from llmkd.cli import config_from, parser, run
from llmkd.distill import train


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoints/<name>/last")
    args = p.parse_args()
    result = train(config_from(args), resume=args.resume)
    print(f"best valid ndcg@10 {result['best_valid_ndcg@10']:.4f} at epoch {result['best_epoch']}")


if __name__ == "__main__":
    run(main)
