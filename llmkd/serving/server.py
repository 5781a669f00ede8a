"""`llmkd serve`: run the HTTP service (`llmkd.serving.http`) on uvicorn, in one process or several.

This module imports neither torch nor the bundle: with `workers` > 1 the process that runs it only
supervises uvicorn's worker processes, each of which loads the bundle itself (`http.app_from_env`), so
the supervisor stays small (~50 MiB, against ~270 MiB for a process holding torch and the bundle). The
bundle is checked once, in a short-lived child, before the workers start: a bad bundle is one error
line, not workers failing and restarting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from llmkd.infra.artifacts import LlmkdError, notice, recover_if_needed
from llmkd.serving.manifest import check_files
from llmkd.serving.metrics import MULTIPROC_ENV
from llmkd.serving.workers import ADMIN_TOKEN_ENV, ServiceOptions, set_worker_spec

CHECK = """
import sys
from llmkd.infra.artifacts import LlmkdError
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


class Supervisor:
    """uvicorn's `Multiprocess` supervisor of `--workers N`, with SIGHUP meaning "reload the bundle": it is
    sent on to every worker, each of which loads and verifies the bundle beside its old one and swaps it in
    (uvicorn's own SIGHUP restarts the workers, and a bad bundle would then crash them one by one). Workers
    that die are replaced as uvicorn does (a new one loads the bundle as it is now); their gauges are marked
    dead for the metrics. Built lazily: the class derives from uvicorn's, imported only here."""

    @staticmethod
    def run(config, sockets) -> None:
        from uvicorn.supervisors.multiprocess import Multiprocess

        class Reloading(Multiprocess):
            def handle_hup(self) -> None:
                notice("SIGHUP: every worker reloads the bundle")
                for process in self.processes:
                    if process.pid is not None and process.process.is_alive():
                        os.kill(process.pid, signal.SIGHUP)

            def keep_subprocess_alive(self) -> None:
                before = {p.pid for p in self.processes}
                super().keep_subprocess_alive()
                gone = before - {p.pid for p in self.processes}
                if gone and os.environ.get(MULTIPROC_ENV):
                    from prometheus_client import multiprocess

                    for pid in gone:
                        multiprocess.mark_process_dead(pid)

        Reloading(config, sockets=sockets).run()


def exit_quietly_after_drain() -> None:
    """uvicorn drains on SIGTERM and then raises the signal again, under the handler it found: with the
    default one the process would end killed by SIGTERM (exit 143) after a clean drain. A handler that does
    nothing lets `serve` return, so the command exits 0."""
    signal.signal(signal.SIGTERM, lambda signum, frame: None)


def serve(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          backend: str = "torch", workers: int = 1, options: ServiceOptions | None = None,
          drain_timeout: float = 30.0) -> None:
    """Load `bundle` (user tower on `backend`: torch or onnx) and serve it until SIGTERM / SIGINT, then drain:
    stop accepting, answer every accepted request (at most `drain_timeout` s), exit 0. `workers` > 1
    runs that many server processes on the port (uvicorn's workers), each with its own copy of the bundle,
    its own micro-batcher and cores / workers torch threads: one process's event loop and model thread share
    one interpreter lock, so a second process is what puts both cores to work (ml-100k, 32 clients: lower p99 and
    more requests/s with 2 processes than 1, memory flat: results/serving_load_cpu_workers2.json against
    results/serving_load_cpu.json). Every file of
    the bundle is first checked against its manifest, SHA-256 included (`llmkd.serving.manifest`). SIGHUP
    (or `POST /admin/reload`) reloads the bundle path: docs/serving.md."""
    import uvicorn

    if workers < 1:
        raise LlmkdError(f"--workers: expected >= 1, got {workers}")
    if drain_timeout <= 0:
        raise LlmkdError(f"--drain-timeout: expected seconds > 0, got {drain_timeout}")
    options = options or ServiceOptions(admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None)
    target = Path(bundle).resolve()
    recover_if_needed(target)  # an interrupted add-items is repaired before the files are checked
    version = check_files(target, full=True)  # every file's SHA-256 once here; each load then checks sizes
    notice(f"{bundle}: bundle version {version}, every file matches its manifest.json")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload once the server runs; until then, not an exit
    exit_quietly_after_drain()
    settings = {"host": host, "port": port, "log_level": log_level, "timeout_graceful_shutdown": drain_timeout}
    if workers == 1:
        from llmkd.serving.http import frozen_app

        uvicorn.run(frozen_app(bundle, backend, options), **settings)
        return
    check_bundle(bundle, backend)
    threads = max(1, (os.cpu_count() or 1) // workers)
    set_worker_spec(bundle, backend, threads, options)
    with tempfile.TemporaryDirectory(prefix="llmkd-metrics-") as metrics_dir:
        os.environ.setdefault(MULTIPROC_ENV, metrics_dir)  # the workers' metrics, summed by any one of them
        config = uvicorn.Config("llmkd.serving.http:app_from_env", factory=True, workers=workers, **settings)
        Supervisor.run(config, [config.bind_socket()])
