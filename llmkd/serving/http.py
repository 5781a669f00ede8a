"""The HTTP service over a bundle: FastAPI on uvicorn (OpenAPI docs at /docs).

    POST /recommend         {"history": [ids], "k": 10, "exclude": [ids] | null, "unknown": "error" | "drop"}
    POST /recommend/batch   {"histories": [[ids], ...], "k": 10, "exclude": [[ids] | null, ...] | null, ...}
    GET  /items/{id}/similar?k=10
    GET  /health (liveness), GET /ready (readiness), GET /metadata: each with the served bundle's version
    GET  /metrics           Prometheus text format (`llmkd.serving.metrics`)
    POST /admin/reload      load the bundle path again, verify, swap (`llmkd.serving.ops`; needs a token)

Every bad request gets a 4xx whose body is {"error": "<field>: <what was expected>", "field": "<field>"}:
malformed JSON, wrong types, unknown item ids (422; 404 for the path's item), k outside [1, catalog],
histories over `max_history` items or batches over `max_batch` (422), bodies over `max_body` bytes (413).
Every model call goes through one worker (`llmkd.serving.batching.MicroBatcher`): single requests that
arrive while it is busy are answered together by one `recommend_batch`, and concurrent requests never
run the model side by side on the same cores. Its queue is bounded (`max_queue` model calls waiting or
running): past it a request gets 503 with Retry-After at once. The served bundle can be swapped while the
server runs (`llmkd.serving.reload`): each request takes one model for its whole life.
"""

from __future__ import annotations

import gc
import json
import os
import signal
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Route

from llmkd.serving.batching import MicroBatcher, Overloaded
from llmkd.serving.metrics import CONTENT_TYPE, Instrumented, ServiceMetrics
from llmkd.serving.ops import Admission, error_response, lifespan, overloaded, reload_route
from llmkd.serving.recommender import BadRequest, Recommender, UnknownItems
from llmkd.serving.reload import ModelSlot, load_verified
from llmkd.serving.workers import ADMIN_TOKEN_ENV, ServiceOptions, worker_spec

MAX_HISTORY = 10_000
"""Longest history (and exclude list) accepted: the user tower reads the last `max_len` items anyway."""
MAX_BATCH = 1_024

Ids = list[StrictStr]


class RecommendRequest(BaseModel):
    """One history, oldest item first."""

    model_config = ConfigDict(extra="forbid")
    history: Ids = Field(max_length=MAX_HISTORY, description="item ids, oldest first; [] = popular items")
    k: StrictInt = Field(10, description="how many items (1 .. catalog size)")
    exclude: Ids | None = Field(None, max_length=MAX_HISTORY, description="more item ids never to recommend")
    exclude_seen: bool = Field(True, description="leave the history's items out")
    unknown: Literal["error", "drop"] = Field("error", description="unknown ids: an error (422) or dropped")


class BatchRequest(BaseModel):
    """Many histories in one call (one user-tower pass, one index search)."""

    model_config = ConfigDict(extra="forbid")
    histories: list[Ids] = Field(max_length=MAX_BATCH)
    k: StrictInt = 10
    exclude: list[Ids | None] | None = None
    exclude_seen: bool = True
    unknown: Literal["error", "drop"] = "error"


class Recommendations(BaseModel):
    items: list[str]
    scores: list[float]


error = error_response

def field_name(loc: tuple) -> str:
    """A pydantic error location -> 'history[3]', 'k', 'body' (the 'body' / 'query' / 'path' prefix dropped)."""
    parts = list(loc[1:]) or [loc[0]]
    name = str(parts[0])
    for p in parts[1:]:
        name += f"[{p}]" if isinstance(p, int) else f".{p}"
    return name


def validation_error(request: Request | None, exc: RequestValidationError) -> JSONResponse:
    """422 naming the first bad field; malformed JSON names the body."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error(422, "body", f"malformed JSON ({first.get('ctx', {}).get('error', first['msg'])})")
    msg = first["msg"]
    if first.get("type") == "too_long":
        msg = f"too long: at most {first.get('ctx', {}).get('max_length')} entries"
    return error(422, field_name(tuple(first["loc"])), msg)


def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own 4xx (no such route, wrong method, a body that cannot be parsed at all) in the same shape."""
    field = "body" if exc.status_code in (400, 413) else "path" if exc.status_code in (404, 405) else "request"
    return error(exc.status_code, field, str(exc.detail))


def bad_request(request: Request | None, exc: BadRequest) -> JSONResponse:
    """422 naming the field the Recommender refused (404 for the path's unknown item)."""
    status = 404 if isinstance(exc, UnknownItems) and exc.field == "item_id" else 422
    return error(status, exc.field, str(exc).split(": ", 1)[1])


def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not a bad request: 500 in the same JSON shape (Starlette re-raises it, so uvicorn logs the traceback)."""
    return error(500, "server", f"internal error ({type(exc).__name__}); see the server log")


class BodyLimit:
    """Pure ASGI middleware: 413 for a body over `max_body` bytes. A declared length is checked before
    anything reads the body; a body without one (chunked) is counted as it is read, and the read that
    passes the limit raises the 413 (an HTTPException, so every route answers it the same way) instead of
    the whole stream being held. (Starlette's `@app.middleware("http")` runs every request through extra
    tasks and stream copies: a profile under load put ~20 % of the event loop's time there.)"""

    def __init__(self, app, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if size is not None and (not size.isdigit() or int(size) > self.max_body):
                response = error(413, "body", f"at most {self.max_body} bytes, got {size.decode('latin-1')}")
                await response(scope, receive, send)
                return
            if size is None:
                receive = self.counted(receive)
        await self.app(scope, receive, send)

    def counted(self, receive):
        """`receive` that raises a 413 once the body read so far passes `max_body` bytes."""
        read = 0

        async def wrapped():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.max_body:
                raise HTTPException(413, f"at most {self.max_body} bytes, got more (chunked)")
            return message

        return wrapped


def json_response(content: dict, version: str | None = None) -> Response:
    """`content` as compact JSON, without FastAPI's response-model validation; `version`: the bundle version
    that answered, in the `x-bundle-version` header."""
    return Response(json.dumps(content, separators=(",", ":"), allow_nan=False).encode(), media_type="application/json",
                    headers=None if version is None else {"x-bundle-version": version})


class RecommendEndpoint:
    """`POST /recommend` as a plain ASGI app, the hot path: the body is validated straight from its bytes
    (`model_validate_json`) and answered without FastAPI's per-request machinery (dependency solving, request
    and response wrapping: ~60 % of the event loop's time under a 32-client load). Errors are the same
    responses the FastAPI route gives (the route stays registered behind it, for the OpenAPI docs). A full
    queue is answered 503 before the body is parsed."""

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot

    async def __call__(self, scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        served = self.slot.current  # one model for the whole request
        batcher = served.batcher
        if batcher.full:
            await overloaded()(scope, receive, send)
            return
        try:
            req = RecommendRequest.model_validate_json(body)
            result = await batcher.recommend(req.history, req.k, req.exclude, req.exclude_seen, req.unknown)
            response = json_response(result, served.version or "")
        except ValidationError as e:
            errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
            response = validation_error(None, RequestValidationError(errors))
        except BadRequest as e:
            response = bad_request(None, e)
        except Overloaded:
            response = overloaded()
        await response(scope, receive, send)


class HotPath:
    """The ASGI application uvicorn runs: `POST /recommend` goes through only the layers it needs (request
    counting, the queue's admission, the body limit, `RecommendEndpoint`), every other request through the
    FastAPI app, lifespan included. FastAPI's own layers (its telemetry check, error and exception middleware,
    routing) were ~15 % of the event loop's time per request under a 4x overload (py-spy), where every
    refusal costs nearly what an answer does. Its errors are the FastAPI app's: a body over the limit 413, a
    bug 500 (re-raised, so uvicorn logs the traceback)."""

    def __init__(self, app: FastAPI) -> None:
        state, opts = app.state, app.state.options
        self.app, self.state = app, state
        hot = Admission(BodyLimit(self.answer, max_body=opts.max_body), slot=state.slot)
        self.hot = Instrumented(hot, metrics=state.metrics) if opts.metrics else hot
        self.endpoint = RecommendEndpoint(state.slot)

    async def answer(self, scope, receive, send) -> None:
        started = False

        async def sending(message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.endpoint(scope, receive, sending)
        except HTTPException as e:
            if started:
                raise
            await http_error(None, e)(scope, receive, send)
        except Exception as e:
            if not started:
                await internal_error(None, e)(scope, receive, send)
            raise

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/recommend" and scope["method"] == "POST":
            await self.hot(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(rec: Recommender, bundle: str | Path | None = None, backend: str = "torch",
               options: ServiceOptions | None = None, folder: Path | None = None) -> FastAPI:
    """The FastAPI application over a loaded `Recommender`; `bundle` is the path reloads read again (None:
    no reloads). See the module docstring for the routes."""
    opts = options or ServiceOptions()
    metrics = ServiceMetrics()
    slot = ModelSlot(bundle or "", backend, rec, folder or Path(bundle or "."),
                     lambda r: MicroBatcher(r, opts.max_batch, opts.max_queue),
                     on_swap=lambda served: metrics.serving(served.version, served.rec.num_items))
    metrics.serving(rec.version, rec.num_items)
    metrics.depth = lambda: slot.current.batcher.pending
    app = FastAPI(title="llmkd recommender", version=str(rec.config.get("format_version")),
                  description=f"Bundle of `{rec.config.get('student')}`: {rec.num_items} items.",
                  lifespan=lifespan)
    app.state.slot, app.state.metrics, app.state.options = slot, metrics, opts
    app.state.reloadable = bundle is not None
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(BadRequest, bad_request)
    app.add_exception_handler(Overloaded, lambda request, exc: overloaded())
    app.add_middleware(BodyLimit, max_body=opts.max_body)
    app.add_middleware(Admission, slot=slot)  # before the body limit and the routing: refusals stay cheap
    if opts.metrics:
        app.add_middleware(Instrumented, metrics=metrics)  # outermost: every answer is counted, 413s too

    def batcher() -> MicroBatcher:
        return slot.current.batcher

    @app.get("/health")
    def health() -> dict:
        """Liveness: the process answers; the bundle version it serves."""
        cur = slot.current.rec
        return {"status": "ok", "items": cur.num_items, "version": cur.version, "pid": os.getpid()}

    @app.get("/ready")
    def ready() -> dict:
        """Readiness: a verified bundle is loaded and answering (a reload keeps the old one serving)."""
        cur = slot.current.rec
        return {"status": "ready", "items": cur.num_items, "version": cur.version, "pid": os.getpid(),
                "reloading": slot.loading, "last_reload": slot.last}

    @app.get("/metadata")
    def metadata() -> dict:
        return slot.current.rec.metadata()

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        if not opts.metrics:
            return error(404, "path", "metrics are off (llmkd serve --no-metrics)")
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> Response:
        """Load the bundle path again, verify it, swap it in (`Authorization: Bearer $LLMKD_ADMIN_TOKEN`)."""
        return await reload_route(request, app)

    @app.post("/recommend", response_model=Recommendations)
    async def recommend(req: RecommendRequest) -> Response:  # documents the route; `RecommendEndpoint` answers it
        result = await batcher().recommend(req.history, req.k, req.exclude, req.exclude_seen, req.unknown)
        return json_response(result)

    app.router.routes.insert(0, Route("/recommend", RecommendEndpoint(slot), methods=["POST"]))

    @app.post("/recommend/batch", response_model=list[Recommendations])
    async def recommend_batch(req: BatchRequest) -> list[dict]:
        served = slot.current
        return await served.batcher.call(lambda: served.rec.recommend_batch(req.histories, req.k, req.exclude,
                                                                            req.exclude_seen, req.unknown))

    @app.get("/items/{item_id}/similar", response_model=Recommendations)
    async def similar(item_id: str, k: int = Query(10, description="how many items (1 .. catalog size)")) -> dict:
        served = slot.current
        return await served.batcher.call(lambda: served.rec.similar_items(item_id, k))

    return app


def frozen_app(bundle: str | Path, backend: str = "torch", options: ServiceOptions | None = None) -> HotPath:
    """`create_app` over the bundle, loaded with every SHA-256 checked, then `gc.freeze()`: the bundle and
    libraries are permanent, and without it every full collection walks them again (~100 ms each on the
    ml-100k bundle; under load those pauses were the whole p99)."""
    rec, folder = load_verified(bundle, backend)
    app = HotPath(create_app(rec, bundle, backend, options, folder))
    gc.collect()
    gc.freeze()
    return app


def app_from_env() -> HotPath:
    """The app of one worker process of `llmkd.serving.server.serve(..., workers=N)`: bundle, backend, torch
    threads and service options from the environment (`llmkd.serving.workers`)."""
    import torch

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app's lifespan takes it: a reload, not an exit
    spec = worker_spec()
    torch.set_num_threads(spec["threads"])
    options = ServiceOptions(**spec["options"], admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None,
                             supervisor_pid=spec["supervisor_pid"])
    return frozen_app(spec["bundle"], spec["backend"], options)
