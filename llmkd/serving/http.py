"""The HTTP service over a bundle: FastAPI on uvicorn (OpenAPI docs at /docs).

    POST /recommend         {"history": [ids], "k": 10, "exclude": [ids] | null, "unknown": "error" | "drop"}
    POST /recommend/batch   {"histories": [[ids], ...], "k": 10, "exclude": [[ids] | null, ...] | null, ...}
    GET  /items/{id}/similar?k=10
    GET  /health, GET /metadata

Every bad request gets a 4xx whose body is {"error": "<field>: <what was expected>", "field": "<field>"}:
malformed JSON, wrong types, unknown item ids (422; 404 for the path's item), k outside [1, catalog],
histories over `max_history` items or batches over `max_batch` (422), bodies over `max_body` bytes (413).
Every model call goes through one worker (`llmkd.serving.batching.MicroBatcher`): single requests that
arrive while it is busy are answered together by one `recommend_batch`, and concurrent requests never
run the model side by side on the same cores.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Route

from llmkd.serving.batching import MicroBatcher
from llmkd.serving.recommender import BadRequest, Recommender, UnknownItems
from llmkd.serving.workers import worker_spec

MAX_HISTORY = 10_000
"""Longest history (and exclude list) accepted: the user tower reads the last `max_len` items anyway."""
MAX_BATCH = 1_024
MAX_BODY = 8 * 1024 * 1024

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


def error(status: int, field: str, message: str) -> JSONResponse:
    """The one error body: {"error": "field: message", "field": field}."""
    return JSONResponse(status_code=status, content={"error": f"{field}: {message}", "field": field})


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


def json_response(content: dict) -> Response:
    """`content` as compact JSON, without FastAPI's response-model validation."""
    return Response(json.dumps(content, separators=(",", ":"), allow_nan=False).encode(), media_type="application/json")


class RecommendEndpoint:
    """`POST /recommend` as a plain ASGI app, the hot path: the body is validated straight from its bytes
    (`model_validate_json`) and answered without FastAPI's per-request machinery (dependency solving, request
    and response wrapping: ~60 % of the event loop's time under a 32-client load). Errors are the same
    responses the FastAPI route gives (the route stays registered behind it, for the OpenAPI docs)."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self.batcher = batcher

    async def __call__(self, scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            req = RecommendRequest.model_validate_json(body)
            result = await self.batcher.recommend(req.history, req.k, req.exclude, req.exclude_seen, req.unknown)
            response = json_response(result)
        except ValidationError as e:
            errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
            response = validation_error(None, RequestValidationError(errors))
        except BadRequest as e:
            response = bad_request(None, e)
        await response(scope, receive, send)


def create_app(rec: Recommender, max_body: int = MAX_BODY, max_batch: int = 256) -> FastAPI:
    """The FastAPI application over a loaded `Recommender`; up to `max_batch` single requests are merged."""
    batcher = MicroBatcher(rec, max_batch)
    app = FastAPI(title="llmkd recommender", version=str(rec.config.get("format_version")),
                  description=f"Bundle of `{rec.config.get('student')}`: {rec.num_items} items.")
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)

    app.add_exception_handler(BadRequest, bad_request)
    app.add_middleware(BodyLimit, max_body=max_body)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "items": rec.num_items, "version": rec.version}

    @app.get("/metadata")
    def metadata() -> dict:
        return rec.metadata()

    @app.post("/recommend", response_model=Recommendations)
    async def recommend(req: RecommendRequest) -> Response:  # documents the route; `RecommendEndpoint` answers it
        result = await batcher.recommend(req.history, req.k, req.exclude, req.exclude_seen, req.unknown)
        return json_response(result)

    app.router.routes.insert(0, Route("/recommend", RecommendEndpoint(batcher), methods=["POST"]))

    @app.post("/recommend/batch", response_model=list[Recommendations])
    async def recommend_batch(req: BatchRequest) -> list[dict]:
        return await batcher.call(lambda: rec.recommend_batch(req.histories, req.k, req.exclude, req.exclude_seen,
                                                              req.unknown))

    @app.get("/items/{item_id}/similar", response_model=Recommendations)
    async def similar(item_id: str, k: int = Query(10, description="how many items (1 .. catalog size)")) -> dict:
        return await batcher.call(lambda: rec.similar_items(item_id, k))

    return app


def frozen_app(bundle: str | Path, backend: str = "torch") -> FastAPI:
    """`create_app` over the loaded bundle, then `gc.freeze()`: the bundle and libraries are permanent, and
    without it every full collection walks them again (~100 ms each on the ml-100k bundle; under load those
    pauses were the whole p99)."""
    app = create_app(Recommender.from_pretrained(bundle, backend))
    gc.collect()
    gc.freeze()
    return app


def app_from_env() -> FastAPI:
    """The app of one worker process of `llmkd.serving.server.serve(..., workers=N)`: bundle, backend and torch
    threads from the environment (`llmkd.serving.workers`)."""
    import torch

    spec = worker_spec()
    torch.set_num_threads(spec["threads"])
    return frozen_app(spec["bundle"], spec["backend"])
