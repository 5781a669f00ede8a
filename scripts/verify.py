"""Check a bundle's files against its manifest.json: each present, with its size and SHA-256, none unlisted.

    python scripts/verify.py bundles/ml100k

Prints the bundle's version id when every file matches; otherwise one `error:` line naming the first
file that differs (missing, size, sha256, not listed) and exit status 2. Loads no model (no torch).
"""

import argparse

from llmkd.commands.cli import run
from llmkd.infra.artifacts import recover_if_needed
from llmkd.serving.manifest import check_files, read_manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (scripts/export.py)")
    args = p.parse_args()
    recover_if_needed(args.bundle)  # as every reader does: an interrupted add-items is repaired first
    version = check_files(args.bundle, full=True)
    count = len(read_manifest(args.bundle)["files"])
    print(f"{args.bundle}: version {version}, {count} files match manifest.json (size and sha256)")


if __name__ == "__main__":
    run(main)
