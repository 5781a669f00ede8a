"""Export a trained student as a self-contained serving bundle (towers, vocabulary, FAISS index, card).

    python scripts/export.py --config configs/ml100k.yaml --student student_kd --output bundles/ml100k

The bundle loads with torch, faiss and safetensors only: `llmkd.Recommender.from_pretrained(folder)`.
"""

from llmkd.commands.cli import config_from, parser, run
from llmkd.serving.bundle import export_bundle


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--student", default="student_kd", help="student folder under out_dir")
    p.add_argument("--output", required=True, help="bundle folder to write (replaced atomically if it exists)")
    args = p.parse_args()
    cfg = config_from(args)
    folder = export_bundle(cfg, args.student, args.output)
    print(f"bundle: {args.student} ({cfg.index.type} index) -> {folder}")


if __name__ == "__main__":
    run(main)
