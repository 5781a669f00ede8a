"""Top-k recommendations for one history from a serving bundle, printed as JSON.

    llmkd recommend bundles/ml100k --history 50,172,133 --k 10
    python scripts/recommend.py bundles/ml100k --history 50,172 --k 5 --exclude 1,2 --unknown drop

Prints {"items": [...], "scores": [...]}, best first, the user's seen items excluded (as
`Recommender.recommend`). An empty --history gets the most popular items. Unknown ids are an error
naming them (exit 2) unless --unknown drop.
"""

import argparse
import json

from llmkd.commands.cli import run
from llmkd.serving.recommender import UNKNOWN_POLICIES, Recommender


def id_list(text: str) -> list[str]:
    """'50,172, 133' -> ['50', '172', '133']; '' -> []."""
    return [item.strip() for item in text.split(",") if item.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (llmkd export)")
    p.add_argument("--history", type=id_list, required=True, metavar="ID,ID,...",
                   help="the user's item ids, oldest first, comma-separated ('' = no history)")
    p.add_argument("--k", type=int, default=10, help="number of items (1 .. catalog size)")
    p.add_argument("--exclude", type=id_list, default=None, metavar="ID,ID,...", help="more item ids to leave out")
    p.add_argument("--keep-seen", action="store_true", help="do not exclude the history's own items")
    p.add_argument("--unknown", choices=UNKNOWN_POLICIES, default="error", help="unknown ids: refuse or drop them")
    args = p.parse_args()
    rec = Recommender.from_pretrained(args.bundle)
    print(json.dumps(rec.recommend(args.history, args.k, args.exclude, not args.keep_seen, args.unknown)))


if __name__ == "__main__":
    run(main)
