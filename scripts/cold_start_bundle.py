"""The cold-start protocol through a serving bundle: export a text student, add the run's withheld items
from their text (as scripts/add_items.py does), rank the whole catalog for each cold user with the bundle.

    make cold-start                        # the protocol's own evaluation: <out_dir>/cold_start/results.md
    python scripts/cold_start_bundle.py --config configs/ml100k_cold.yaml --student student_kd --output B

Its Recall / NDCG should equal the '<student> (FAISS ...)' row of <out_dir>/cold_start/results.md: the added
items get the same vectors there and here. Prints both when that file exists.
"""

import json
from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.experiments.coldstart import cold_start_through_bundle


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--student", default=None, help="student folder under out_dir (default: distill.name)")
    p.add_argument("--output", required=True, help="bundle folder to write")
    args = p.parse_args()
    cfg = config_from(args)
    student = args.student or cfg.distill.name
    result = cold_start_through_bundle(cfg, student, args.output)
    print(json.dumps({"bundle": result}, indent=2))
    protocol = Path(cfg.out_dir) / "cold_start" / "results.json"
    if protocol.is_file():
        systems = json.loads(protocol.read_text())["systems"]
        row = f"{student} (FAISS {cfg.index.type})"
        print(json.dumps({"cold_start": {row: systems.get(row, {}).get("whole catalog")}}, indent=2))


if __name__ == "__main__":
    run(main)
