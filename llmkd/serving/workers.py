"""How `llmkd serve --workers N` hands the bundle to its worker processes: one environment variable.

The supervisor (`llmkd.serving.server.serve`) writes it and uvicorn's workers read it back
(`llmkd.serving.http.app_from_env`). It imports nothing heavy, so the supervisor can use it and stay
without torch or the bundle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

WORKER_ENV = "LLMKD_SERVE"
"""How `serve` hands the bundle to worker processes (uvicorn imports `http.app_from_env` in each)."""


def set_worker_spec(bundle: str | Path, backend: str, threads: int) -> None:
    """Record for the worker processes (inherited through the environment) what each one serves."""
    os.environ[WORKER_ENV] = json.dumps({"bundle": str(Path(bundle).resolve()), "backend": backend, "threads": threads})


def worker_spec() -> dict:
    """What `set_worker_spec` recorded: {"bundle", "backend", "threads"}."""
    return json.loads(os.environ[WORKER_ENV])
