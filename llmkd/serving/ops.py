"""Operations of a running service: reload (`POST /admin/reload`, SIGHUP), the overload answer, the drain report.

`POST /admin/reload` needs `Authorization: Bearer <LLMKD_ADMIN_TOKEN>` (the environment variable of the
server; without it the route answers 403 and only SIGHUP reloads). Under `llmkd serve --workers N` the worker
that takes the request reloads itself and signals the supervisor, which sends SIGHUP to every worker; SIGHUP
to the supervisor does the same, SIGHUP to one worker reloads that worker alone. A SIGTERM is uvicorn's drain
(stop accepting, answer what was accepted, at most `--drain-timeout` seconds); the lifespan's exit then
writes one line with what was answered.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmkd.infra.artifacts import notice
from llmkd.serving.metrics import ServiceMetrics
from llmkd.serving.reload import ModelSlot
from llmkd.serving.workers import ADMIN_TOKEN_ENV, ServiceOptions

RETRY_AFTER = "1"
"""Seconds a client refused by a full queue is told to wait (the queue drains in milliseconds)."""


def error_response(status: int, field: str, message: str) -> JSONResponse:
    """The service's one error body: {"error": "field: message", "field": field}."""
    return JSONResponse(status_code=status, content={"error": f"{field}: {message}", "field": field})


OVERLOADED = b'{"error":"server: overloaded, the request queue is full; retry after a second","field":"server"}'
OVERLOADED_START = {"type": "http.response.start", "status": 503, "headers": [
    (b"content-type", b"application/json"), (b"content-length", str(len(OVERLOADED)).encode()),
    (b"retry-after", RETRY_AFTER.encode())]}
MODEL_ROUTES = ("/recommend", "/recommend/batch")


def overloaded() -> Response:
    """503 with Retry-After: the bounded queue refused the request before any work."""
    return Response(OVERLOADED, status_code=503, media_type="application/json", headers={"Retry-After": RETRY_AFTER})


class Admission:
    """Pure ASGI middleware in front of the application: while the model queue is full, a request for a
    model route (`/recommend`, `/recommend/batch`, `/items/.../similar`) is answered 503 + Retry-After from
    two prepared messages, before its body is read or any routing is done, so a refusal costs a small part
    of an answer (under a 4x overload the refusals, not the model, are most of the event loop's work)."""

    def __init__(self, app, slot: ModelSlot) -> None:
        self.app, self.slot = app, slot

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.slot.current.batcher.full and (
                scope["path"] in MODEL_ROUTES or scope["path"].startswith("/items/")):
            await send(OVERLOADED_START)
            await send({"type": "http.response.body", "body": OVERLOADED})
            return
        await self.app(scope, receive, send)


async def reload_route(request: Request, app: FastAPI) -> Response:
    """`POST /admin/reload`: 403 when no token is set, 401 for a wrong one; else this process reloads (and,
    under a supervisor, every other worker is signalled) and the outcome is the body: 200 reloaded or
    unchanged, 409 refused (the old bundle keeps serving; `error` says why)."""
    opts: ServiceOptions = app.state.options
    if opts.admin_token is None:
        return error_response(403, "authorization", f"reload over HTTP is off: set {ADMIN_TOKEN_ENV} for the "
                                                    "server, or send it SIGHUP")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {opts.admin_token}".encode()):
        return error_response(401, "authorization", f"expected 'Bearer <{ADMIN_TOKEN_ENV}>'")
    if not app.state.reloadable:
        return error_response(409, "bundle", "this app was built without a bundle path; nothing to reload")
    outcome = await reload_and_report(app)
    if opts.supervisor_pid is not None:  # the supervisor sends SIGHUP to every worker (this one: unchanged)
        os.kill(opts.supervisor_pid, signal.SIGHUP)
        outcome = {**outcome, "workers_signalled": True}
    if outcome["status"] == "refused":
        return JSONResponse(status_code=409, content={"error": f"bundle: {outcome['error']}", "field": "bundle",
                                                      "reload": outcome})
    return JSONResponse(outcome)


async def reload_and_report(app: FastAPI) -> dict:
    """Reload the app's bundle (`ModelSlot.reload`), count the outcome in the metrics and log it."""
    outcome = await app.state.slot.reload()
    app.state.metrics.reloads.labels(outcome["status"]).inc()
    announce(outcome)
    return outcome


def announce(outcome: dict) -> None:
    """One line on stderr per reload (the server log)."""
    if outcome["status"] == "refused":
        notice(f"reload refused, still serving {outcome['version']}: {outcome['error']}")
    else:
        notice(f"reload: {outcome['status']}, serving {outcome['version']} (was {outcome['previous']}, "
               f"{outcome['seconds']:.2f} s)")


@asynccontextmanager
async def lifespan(app: FastAPI):
    """SIGHUP reloads the bundle while the server runs; at exit (after uvicorn's drain) one line says how
    many requests were answered and how many ended unanswered."""
    loop = asyncio.get_running_loop()
    slot: ModelSlot = app.state.slot
    metrics: ServiceMetrics = app.state.metrics

    tasks: set[asyncio.Task] = set()

    def on_hup() -> None:
        task = loop.create_task(reload_and_report(app))
        tasks.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(tasks.discard)

    if app.state.reloadable and threading.current_thread() is threading.main_thread():
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    yield
    if app.state.reloadable and threading.current_thread() is threading.main_thread():
        loop.remove_signal_handler(signal.SIGHUP)
    by_route = ", ".join(f"{route} {status}: {n}" for (route, status), n in sorted(metrics.counts.items()))
    notice(f"stopped after draining: {metrics.answered} requests answered ({by_route}), {metrics.unanswered} ended "
           f"without an answer, {slot.current.batcher.pending} model calls left")


