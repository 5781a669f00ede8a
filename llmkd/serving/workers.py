"""What a server process serves, and how `llmkd serve --workers N` hands it to its worker processes: the
service options and one environment variable.

The supervisor (`llmkd.serving.server.serve`) writes it and uvicorn's workers read it back
(`llmkd.serving.http.app_from_env`). It imports nothing heavy, so the supervisor can use it and stay
without torch or the bundle.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from llmkd.infra.artifacts import LlmkdError

WORKER_ENV = "LLMKD_SERVE"
"""How `serve` hands the bundle to worker processes (uvicorn imports `http.app_from_env` in each)."""
ADMIN_TOKEN_ENV = "LLMKD_ADMIN_TOKEN"
"""The token `POST /admin/reload` asks for (`Authorization: Bearer <token>`); unset, the route is off."""
MAX_QUEUE = 64
"""Model calls one server process holds (waiting or running) before it answers 503."""
MAX_BODY = 8 * 1024 * 1024


@dataclass
class ServiceOptions:
    """How one server process serves its bundle."""

    max_batch: int = 256
    """Single requests merged into one model call at most."""
    max_queue: int = MAX_QUEUE
    """Model calls held (waiting or running) before new ones get 503 + Retry-After."""
    max_body: int = MAX_BODY
    metrics: bool = True
    """Count requests for GET /metrics (off: the route answers 404; to measure what counting costs)."""
    admin_token: str | None = None
    """`POST /admin/reload` needs `Authorization: Bearer <token>`; None turns the route off (403)."""
    supervisor_pid: int | None = None
    """With `--workers N`: the process that fans a reload out to every worker (SIGHUP)."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_body"):
            if getattr(self, name) < 1:
                raise LlmkdError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise LlmkdError(f"{ADMIN_TOKEN_ENV}: expected a token of at least 16 characters, got "
                             f"{len(self.admin_token)}")


def set_worker_spec(bundle: str | Path, backend: str, threads: int, options: ServiceOptions | None = None) -> None:
    """Record for the worker processes (inherited through the environment) what each one serves. The bundle
    path is kept as given (made absolute, not resolved): a symbolic link is followed again at each reload."""
    opts = asdict(options or ServiceOptions())
    for secret in ("admin_token", "supervisor_pid"):  # the token stays in its own variable; the pid is this one
        opts.pop(secret)
    os.environ[WORKER_ENV] = json.dumps({"bundle": str(Path(bundle).absolute()), "backend": backend,
                                         "threads": threads, "options": opts, "supervisor_pid": os.getpid()})


def worker_spec() -> dict:
    """What `set_worker_spec` recorded: {"bundle", "backend", "threads", "options", "supervisor_pid"}."""
    return json.loads(os.environ[WORKER_ENV])
