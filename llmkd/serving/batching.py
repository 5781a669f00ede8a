"""Micro-batching for the HTTP service: single-history requests that wait together are answered together.

A CPU serves a batch of histories for little more than one (one user-tower pass, one index search), and
several model calls at once only fight over the same cores. So every model call goes through one worker:
while it computes, new requests queue; when it is free it takes everything queued (up to `max_batch`
single requests, grouped by their options) and answers it in one `recommend_batch` call per group. There
is no timer: an idle server answers a lone request at once, a loaded one batches as deep as its queue.

The queue is bounded: past `max_queue` model calls waiting or running, a new one raises `Overloaded` at
once (the HTTP service answers 503 with Retry-After) instead of joining a queue that only grows: an
accepted request then waits for at most the batch in progress and its own.

Requests are checked before they queue (`Recommender.check_request`), so a bad one gets its own 4xx and
never fails the batch it would have joined; should a merged call fail anyway, its requests are answered
one by one, each with its own result or error.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from llmkd.serving.recommender import Recommender
from llmkd.serving.workers import MAX_QUEUE


class Overloaded(Exception):
    """The queue is full: the request was refused before any work (HTTP 503 with Retry-After)."""


class MicroBatcher:
    """One model worker for the service: `recommend` merges concurrent single requests, `call` runs
    anything else (a batch request, similar items) in the same worker, one model call at a time; at most
    `max_queue` calls are held at once (`pending`), past that a call raises `Overloaded`."""

    def __init__(self, rec: Recommender, max_batch: int = 256, max_queue: int = MAX_QUEUE) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue: expected >= 1, got {max_queue}")
        self.rec, self.max_batch, self.max_queue = rec, max_batch, max_queue
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llmkd-model")
        self.batches: deque[int] = deque(maxlen=1000)  # sizes of the last 1,000 merged calls
        self.pending = 0  # calls accepted and not yet answered

    @property
    def full(self) -> bool:
        """Whether a new call would be refused now (`Overloaded`)."""
        return self.pending >= self.max_queue

    def _start(self) -> asyncio.Queue:
        if self.queue is None:  # created in the server's event loop, on first use
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._run())
        return self.queue

    async def recommend(self, history: list[str], k: int, exclude: list[str] | None = None,
                        exclude_seen: bool = True, unknown: str = "error") -> dict[str, list]:
        """`Recommender.recommend`, merged with whatever else is waiting; a bad request raises at once."""
        self.rec.check_request(history, k, exclude, unknown)
        return await self._submit(("one", (history, k, exclude, exclude_seen, unknown)))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` (a model call) in the worker, after the calls queued before it."""
        return await self._submit(("call", fn))

    async def _submit(self, job: tuple) -> Any:
        if self.pending >= self.max_queue:
            raise Overloaded(f"{self.pending} requests queued (the limit, --max-queue)")
        future = asyncio.get_running_loop().create_future()
        self.pending += 1
        try:
            self._start().put_nowait((*job, future))
            return await future
        finally:
            self.pending -= 1

    async def close(self) -> None:
        """Answer every call accepted so far, then stop the worker and its thread (the batcher of a bundle
        that was swapped out: requests that took it keep it until they are answered)."""
        while self.pending:
            await asyncio.sleep(0.005)
        if self.worker is not None:
            self.worker.cancel()
        self.pool.shutdown(wait=False)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            singles = jobs[0][0] == "one"
            while not self.queue.empty() and singles < self.max_batch:
                jobs.append(self.queue.get_nowait())
                singles += jobs[-1][0] == "one"
            ones = [j for j in jobs if j[0] == "one"]
            if ones:
                await loop.run_in_executor(self.pool, self._answer, ones)
            for _, fn, future in (j for j in jobs if j[0] == "call"):
                try:
                    settle(future, result=await loop.run_in_executor(self.pool, fn))
                except Exception as e:  # noqa: BLE001 - handed to the request that asked
                    settle(future, error=e)

    def _answer(self, ones: list[tuple]) -> None:
        """Answer single requests, one `recommend_batch` per group of equal options (runs in the worker)."""
        groups: dict[tuple, list[tuple]] = {}
        for job in ones:
            history, k, exclude, exclude_seen, unknown = job[1]
            groups.setdefault((k, exclude_seen, unknown), []).append(job)
        for (k, exclude_seen, unknown), group in groups.items():
            self.batches.append(len(group))
            try:
                results = self.rec.recommend_batch([j[1][0] for j in group], k, [j[1][2] for j in group],
                                                   exclude_seen, unknown)
            except Exception:  # noqa: BLE001 - answer each on its own, so only a bad one fails
                for job in group:
                    self._one(job)
                continue
            for job, result in zip(group, results):
                job[2].get_loop().call_soon_threadsafe(settle, job[2], result)

    def _one(self, job: tuple) -> None:
        history, k, exclude, exclude_seen, unknown = job[1]
        try:
            result, err = self.rec.recommend(history, k, exclude, exclude_seen, unknown), None
        except Exception as e:  # noqa: BLE001
            result, err = None, e
        job[2].get_loop().call_soon_threadsafe(settle, job[2], result, err)


def settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's result or exception unless its request went away (client disconnected)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
