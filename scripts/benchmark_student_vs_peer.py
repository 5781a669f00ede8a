"""Training speed of llmkd's student beside RecTools' SASRec (the peer of `make peer-beauty`), side by side on the
same data, batch size and threads (llmkd.experiments.student_vs_peer).

    python scripts/benchmark_student_vs_peer.py --config configs/amazon_beauty.yaml --dims 64 128 \\
        --output results/student_vs_peer_cpu.json      # and a .md beside it

Needs <out_dir>/data (scripts/prepare_data.py) and RecTools (`make peer-beauty` installs it). Run it on an
otherwise idle machine; the ratios are measured in one run, the seconds are this machine's.
"""

import json
from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.data import load_data
from llmkd.experiments.peers import PeerSettings
from llmkd.experiments.scale_micro import environment
from llmkd.infra.artifacts import LlmkdError, write_json


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="student widths to time")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--batches", type=int, default=8, help="training batches per system per round")
    p.add_argument("--output", type=Path, required=True, help="results JSON (a .md of the same name beside it)")
    args = p.parse_args()
    if min(args.dims + [args.threads, args.rounds, args.batches]) < 1:
        raise LlmkdError("--dims, --threads, --rounds and --batches must be at least 1")
    try:
        import rectools  # noqa: F401
    except ImportError:
        raise LlmkdError("RecTools is not installed: `make peer-beauty` installs it (see the Makefile's PEERS)") from None
    from llmkd.experiments.student_vs_peer import markdown, student_vs_peer

    cfg = config_from(args)
    data = load_data(Path(cfg.out_dir) / "data")
    settings = PeerSettings(batch_size=cfg.distill.batch_size)
    result = {"config": args.config, "env": environment(),
              **student_vs_peer(cfg, data, settings, args.dims, args.batches, args.rounds, args.threads)}
    write_json(args.output, result)
    args.output.with_suffix(".md").write_text(markdown(result) + "\n", encoding="utf-8")
    print(markdown(result))
    print(json.dumps({"written": str(args.output)}))


if __name__ == "__main__":
    run(main)
