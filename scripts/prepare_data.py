"""Load interactions + item text, split them (docs/protocol.md) and write `<out_dir>/data/`."""

import sys
from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.data import build_data, no_eval_users, save_data, split_checksums
from llmkd.infra.artifacts import StageTimer
from llmkd.infra.locks import artifact_lock


def main() -> None:
    args = parser(__doc__).parse_args()
    cfg = config_from(args)
    with artifact_lock(Path(cfg.out_dir) / "data"), StageTimer() as timer:
        data = build_data(cfg.data)
        save_data(data, Path(cfg.out_dir) / "data", cfg.data, timer)
    why = no_eval_users(data)
    if why:
        print(f"warning: {cfg.data.interactions or cfg.data.source}: {why}; later stages will refuse this data",
              file=sys.stderr)
    print(f"data: {data.num_users} users, {data.num_items} items, "
          f"{sum(len(t) for t in data.train)} train interactions -> {Path(cfg.out_dir) / 'data'}")
    print(f"split sha256: {split_checksums(data)}")


if __name__ == "__main__":
    run(main)
