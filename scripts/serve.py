"""Serve a bundle over HTTP (FastAPI on uvicorn; OpenAPI docs at /docs).

    python scripts/serve.py bundles/ml100k --host 127.0.0.1 --port 8000
    curl -s localhost:8000/recommend -H 'content-type: application/json' -d '{"history": ["50", "172"], "k": 10}'
"""

import argparse

from llmkd.cli import run
from llmkd.serving.server import serve


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
    args = p.parse_args()
    serve(args.bundle, args.host, args.port, args.log_level, args.backend, args.workers)


if __name__ == "__main__":
    run(main)
