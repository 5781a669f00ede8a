"""Evaluate popularity, teacher, students and the FAISS-indexed student; write `<out_dir>/eval/`."""

from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.evaluation.report import run_evaluation


def main() -> None:
    cfg = config_from(parser(__doc__).parse_args())
    result = run_evaluation(cfg)
    print(result["markdown"])
    print(f"\nwritten to {Path(cfg.out_dir) / 'eval'}")


if __name__ == "__main__":
    run(main)
