"""`llmkd serve`: run the HTTP service (`llmkd.serving.http`) on uvicorn, in one process or several.

This module imports neither torch nor the bundle: with `workers` > 1 the process that runs it only
supervises uvicorn's worker processes, each of which loads the bundle itself (`http.app_from_env`), so
the supervisor stays small (~50 MiB, against ~270 MiB for a process holding torch and the bundle). The
bundle is checked once, in a short-lived child, before the workers start: a bad bundle is one error
line, not workers failing and restarting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llmkd.artifacts import LlmkdError, notice, recover_if_needed
from llmkd.serving.manifest import check_files
from llmkd.serving.workers import set_worker_spec

CHECK = """
import sys
from llmkd.artifacts import LlmkdError
from llmkd.serving.recommender import Recommender
try:
    Recommender.from_pretrained(sys.argv[1], sys.argv[2])
except LlmkdError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def check_bundle(bundle: str | Path, backend: str) -> None:
    """Load `bundle` in a child process and let it go; its error (a bad bundle) is raised here."""
    proc = subprocess.run([sys.executable, "-c", CHECK, str(bundle), backend], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise LlmkdError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                         f"{bundle}: loading it failed (exit {proc.returncode})")


def serve(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          backend: str = "torch", workers: int = 1) -> None:
    """Load `bundle` (user tower on `backend`: torch or onnx) and serve it until interrupted. `workers` > 1
    runs that many server processes on the port (uvicorn's workers), each with its own copy of the bundle,
    its own micro-batcher and cores / workers torch threads: one process's event loop and model thread share
    one interpreter lock, so a second process is what puts both cores to work (ml-100k, 32 clients: lower p99 and
    more requests/s with 2 processes than 1, memory flat: results/serving_load_cpu_workers2.json against
    results/serving_load_cpu.json). Every file of
    the bundle is first checked against its manifest, SHA-256 included (`llmkd.serving.manifest`)."""
    import uvicorn

    if workers < 1:
        raise LlmkdError(f"--workers: expected >= 1, got {workers}")
    recover_if_needed(bundle)  # an interrupted add-items is repaired before the files are checked
    version = check_files(bundle, full=True)  # every file's SHA-256 once here; each load then checks sizes
    notice(f"{bundle}: bundle version {version}, every file matches its manifest.json")
    if workers == 1:
        from llmkd.serving.http import frozen_app

        uvicorn.run(frozen_app(bundle, backend), host=host, port=port, log_level=log_level)
        return
    check_bundle(bundle, backend)
    threads = max(1, (os.cpu_count() or 1) // workers)
    set_worker_spec(bundle, backend, threads)
    uvicorn.run("llmkd.serving.http:app_from_env", factory=True, workers=workers, host=host, port=port,
                log_level=log_level)
