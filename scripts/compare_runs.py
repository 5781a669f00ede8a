"""Compare students already trained, one folder per seed and system (exported, or a checkpoint's best/ for a
run stopped early): valid and test over seeds, each system paired with the first (95 % user bootstrap and
each seed's difference).

    python scripts/compare_runs.py --config configs/amazon_beauty.yaml --output results/probe \\
        --system student_no_kd=runs/amazon_beauty/a_s0,runs/amazon_beauty/checkpoints/a_s1/best \\
        --system content_init=runs/amazon_beauty/b_s0,runs/amazon_beauty/checkpoints/b_s1/best
"""

import json
from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.experiments.seeds import compare_folders
from llmkd.infra.artifacts import LlmkdError, reading


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--system", action="append", required=True, metavar="NAME=FOLDER[,FOLDER...]",
                   help="a system and its student folders, one per seed (the first system is the baseline)")
    p.add_argument("--output", type=Path, required=True, help="path without suffix: writes .json, .md and _curves.png")
    p.add_argument("--reference", action="append", default=[], metavar="JSON",
                   help='a reference valid curve drawn beside the runs: {"name", "epochs", "values", "source"} '
                        "(e.g. results/reference/sasrec_ce_beauty_valid_curve.json, read from a published log)")
    args = p.parse_args()
    systems = {}
    for s in args.system:
        name, _, folders = s.partition("=")
        if not name or not folders:
            raise LlmkdError(f"--system {s!r}: expected NAME=FOLDER[,FOLDER...]")
        systems[name] = [Path(f) for f in folders.split(",")]
    references = {}
    for path in args.reference:
        with reading(Path(path), "reference curve"):
            ref = json.loads(Path(path).read_text(encoding="utf-8"))
            references[ref["name"]] = {"epochs": ref["epochs"], "values": ref["values"], "source": ref.get("source", path)}
    result = compare_folders(config_from(args), systems, args.output, references)
    print(result["markdown"])


if __name__ == "__main__":
    run(main)
