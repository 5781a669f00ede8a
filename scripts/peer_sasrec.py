"""Peer run: RecTools' SASRec with cross-entropy over the whole catalog, on llmkd's split, scored by llmkd's evaluator.

    python scripts/peer_sasrec.py --config configs/amazon_beauty.yaml --seeds 0 1 2 --output results/peers_beauty.json
    python scripts/peer_sasrec.py --config configs/ml100k.yaml --seeds 0 --epochs 50 --output results/peers_ml100k.json

Needs <out_dir>/data (scripts/prepare_data.py) and RecTools (`make peer-beauty` installs it). Settings are the
published SASRec-CE's (64-d, 2 blocks, 1 head, dropout 0.6, lr 5e-4, batch 512, last 50 items); the epoch is
chosen on valid NDCG@10 (every --eval-every epochs, stopping after --patience evaluations without a better one)
and test is reported once. The JSON (and <output>.per_user.npz, per-user NDCG@10 for paired comparisons) is
rewritten after each seed; seeds already in it with the same settings and data are reused.
"""

from dataclasses import replace

from llmkd.commands.cli import config_from, parser, run
from llmkd.experiments.peer_training import run_peers
from llmkd.experiments.peers import PeerSettings, markdown
from llmkd.infra.artifacts import LlmkdError


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output", required=True, metavar="JSON", help="results file (reused and extended on a rerun)")
    p.add_argument("--epochs", type=int, default=PeerSettings.epochs, help="most epochs per seed")
    p.add_argument("--eval-every", type=int, default=PeerSettings.eval_every, help="epochs between valid evaluations")
    p.add_argument("--patience", type=int, default=PeerSettings.patience,
                   help="valid evaluations without a better NDCG@10 before a seed stops")
    args = p.parse_args()
    if min(args.epochs, args.eval_every, args.patience) < 1:
        raise LlmkdError("--epochs, --eval-every and --patience must be at least 1")
    cfg = config_from(args)
    settings = replace(PeerSettings(), epochs=args.epochs, eval_every=args.eval_every, patience=args.patience)
    try:
        import rectools  # noqa: F401
    except ImportError:
        raise LlmkdError("RecTools is not installed: `make peer-beauty` installs it (see the Makefile's PEERS)") from None
    result = run_peers(cfg.out_dir, args.seeds, args.output, settings)
    print(markdown(result))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    run(main)
