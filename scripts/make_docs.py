"""Write the tables of README.md and docs/*.md from the JSON files in results/ (between `<!-- table:NAME -->` and
`<!-- /table:NAME -->`; the prose around them is left as it is). `--check` only lists the stale tables and exits 1
if there are any.

    python scripts/make_docs.py            # = make docs
    python scripts/make_docs.py --check
"""

import argparse
import sys
from pathlib import Path

from llmkd.experiments.docs import make_docs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="the repository root")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a table is stale")
    args = p.parse_args()
    found = make_docs(args.root, check=args.check)
    for page, names in found.items():
        print(f"{page}: {'stale' if args.check else 'rewrote'} {', '.join(names)}")
    if args.check and found:
        sys.exit(1)


if __name__ == "__main__":
    main()
