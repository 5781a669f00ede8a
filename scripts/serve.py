"""Serve a bundle over HTTP (FastAPI on uvicorn; OpenAPI docs at /docs). Operations: docs/serving.md.

    python scripts/serve.py bundles/ml100k --host 127.0.0.1 --port 8000
    curl -s localhost:8000/recommend -H 'content-type: application/json' -d '{"history": ["50", "172"], "k": 10}'
    kill -HUP <pid>                      # reload the bundle path (verified beside the old one, then swapped)
    curl -X POST localhost:8000/admin/reload -H "Authorization: Bearer $LLMKD_ADMIN_TOKEN"   # the same over HTTP
    kill -TERM <pid>                     # stop accepting, answer what was accepted, exit 0
    curl -s localhost:8000/metrics       # Prometheus text format
"""

import argparse
import os

from llmkd.commands.cli import run
from llmkd.serving.server import serve
from llmkd.serving.workers import ADMIN_TOKEN_ENV, MAX_QUEUE, ServiceOptions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (scripts/export.py)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                   help="user tower on torch, or on ONNX Runtime (the bundle's user_tower.onnx: llmkd export-onnx)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes, each with a copy of the bundle (2 on a 2-core machine: more requests/s and a "
                        "lower p99 at 32 clients, results/serving_load_cpu_workers2.json)")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help="model calls each server process holds (waiting or running); past it 503 + Retry-After")
    p.add_argument("--max-batch", type=int, default=256, help="single requests merged into one model call at most")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds to answer accepted requests before the rest are cut")
    p.add_argument("--no-metrics", action="store_true", help="no request counting and no /metrics (to measure its cost)")
    args = p.parse_args()
    options = ServiceOptions(max_batch=args.max_batch, max_queue=args.max_queue, metrics=not args.no_metrics,
                             admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None)
    serve(args.bundle, args.host, args.port, args.log_level, args.backend, args.workers, options, args.drain_timeout)


if __name__ == "__main__":
    run(main)
