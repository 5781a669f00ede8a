"""Add new items to a serving bundle from their text, without retraining (text students only).

    python scripts/add_items.py bundles/ml100k new_items.csv

The items file has an item_id column and the columns of the bundle's text template (CSV / TSV / Parquet /
JSONL). The bundle's teacher embeds each text, the student's content projection maps it, and the items
join the vocabulary and the index in one atomic rewrite: a crash leaves the old bundle intact.
"""

import argparse
import os

from llmkd.commands.add_items import add_items
from llmkd.commands.cli import run
from llmkd.infra.locks import WAIT_ENV


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (scripts/export.py)")
    p.add_argument("items", help="items file: item_id + the text template's columns")
    p.add_argument("--wait-lock", nargs="?", const="inf", default=None, metavar="SECONDS",
                   help="when another run is writing the bundle, wait for it (for SECONDS, or as long as it takes) "
                        "instead of stopping at once")
    args = p.parse_args()
    if args.wait_lock is not None:
        os.environ[WAIT_ENV] = args.wait_lock
    result = add_items(args.bundle, args.items)
    print(f"added {result['added']} items to {args.bundle}: catalog now {result['num_items']} items")


if __name__ == "__main__":
    run(main)
