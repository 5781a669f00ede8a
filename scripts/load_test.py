"""Load test of `llmkd serve` on loopback: N concurrent clients for a fixed time, bounded in requests.

    python scripts/load_test.py bundles/ml100k --clients 32 --duration 30 --output results/serving_load.json
    llmkd load-test bundles/ml100k --url http://127.0.0.1:8000 --server-pid 12345   # a server already running

Without --url it starts `llmkd serve BUNDLE` on 127.0.0.1 itself and stops it at the end. Reports latency
p50/p95/p99, requests/s, errors and the server's RSS before and after (llmkd/serving/load_test.py);
writes the JSON to --output, a markdown table and a plot of the run over time (server RSS, p99 and
requests/s per window) beside it.
"""

import argparse
import json
from pathlib import Path

from llmkd.commands.cli import run
from llmkd.infra.artifacts import write_json
from llmkd.serving.load_test import LoadConfig, load_test, markdown


def plot(result: dict, path: Path) -> None:
    """Server RSS and p99 / requests/s per window over the measured phase (`result["series"]`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["series"]
    t = [e["t_s"] for e in series]
    fig, (mem, lat) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    rss = [e["rss_mb"] or 0.0 for e in series]
    mem.plot(t, rss, color="tab:blue")
    mem.set_ylabel("server RSS (MiB)")
    mem.set_ylim(0, 1.15 * max(rss, default=1.0) or 1.0)  # growth at the scale of the whole
    lat.plot(t, [e["p99_ms"] for e in series], color="tab:red", label="p99 (ms)")
    lat.set_ylabel("p99 per window (ms)")
    lat.set_xlabel("seconds into the measured run")
    rps = lat.twinx()
    rps.plot(t, [e["requests_per_s"] for e in series], color="tab:gray", alpha=0.6, label="requests/s")
    rps.set_ylabel("requests/s")
    workers = result.get("server_workers") or 1
    p99 = "n/a" if result["p99_ms"] is None else f"{result['p99_ms']:.1f} ms"
    mem.set_title(f"{result['config']['clients']} clients, {workers} server process{'es' if workers > 1 else ''}: "
                  f"p99 {p99}, {result['requests_per_s']:.0f} requests/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (llmkd export): served, and the source of the request histories")
    p.add_argument("--url", default=None, help="a server already running on loopback (default: start one)")
    p.add_argument("--server-pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
    p.add_argument("--clients", type=int, default=32, help="concurrent keep-alive clients")
    p.add_argument("--duration", type=float, default=30.0, help="seconds measured")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured requests first")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds after which a request is an error")
    p.add_argument("--seed", type=int, default=0, help="seed of the request histories")
    p.add_argument("--server-workers", type=int, default=1,
                   help="without --url: `llmkd serve --workers` of the server started here")
    p.add_argument("--output", default="results/serving_load.json", help="JSON report (a .md beside it)")
    args = p.parse_args()
    cfg = LoadConfig(clients=args.clients, duration_s=args.duration, max_requests=args.max_requests,
                     warmup_s=args.warmup, k=args.k, timeout_s=args.timeout, seed=args.seed)
    result = load_test(args.bundle, cfg, args.url, args.server_pid, args.server_workers)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    md = markdown(result)
    out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    plot(result, out.with_suffix(".png"))
    print(md)
    print(json.dumps({k: result[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "errors")}))
    print(f"-> {out}")


if __name__ == "__main__":
    run(main)
