"""Hot swap of the served bundle: the new one is loaded and verified beside the old, then swapped in.

What a request uses, from its first check to its answer, is one `Served` (a `Recommender` and its own
`MicroBatcher`), taken once from `ModelSlot.current`. A reload replaces `current` by one assignment in the
event loop, so a request sees the old model or the new one, never a mix; the old batcher answers what it
accepted and is then closed. A bundle that fails to load or to verify (any SHA-256, `llmkd verify`) leaves
the old one serving, and the reload's outcome says why.

The bundle path is read again at each reload: a folder that `llmkd add-items` rewrote (atomically: a new
folder renamed over the old), or a symbolic link re-pointed to another bundle folder (`ln -sfn v2 current`,
followed once per reload). A folder replaced while it was being read is noticed (its inode or its manifest's
version changed) and read again, so a reload never serves half of an addition.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkd.infra.artifacts import LlmkdError, recover_if_needed
from llmkd.serving.batching import MicroBatcher
from llmkd.serving.manifest import MANIFEST, check_files, read_manifest
from llmkd.serving.recommender import Recommender

ATTEMPTS = 3
"""Reads of a bundle that keeps being replaced while it is read, before the reload gives up."""


@dataclass(frozen=True)
class Served:
    """One loaded bundle and the batcher that runs its model calls."""

    rec: Recommender
    batcher: MicroBatcher
    folder: Path
    """The folder it was read from (a symbolic link's target at that time)."""

    @property
    def version(self) -> str | None:
        return self.rec.version


def folder_identity(folder: Path) -> tuple[int, int, int]:
    """(device, inode, manifest mtime): what changes when a folder is replaced or its manifest rewritten."""
    st = os.stat(folder)
    return st.st_dev, st.st_ino, os.stat(folder / MANIFEST).st_mtime_ns


def load_verified(bundle: str | Path, backend: str = "torch") -> tuple[Recommender, Path]:
    """Load `bundle` (a symbolic link followed once) with every file's SHA-256 checked against its manifest;
    read again when the folder was replaced while it was read. Returns (recommender, the folder read)."""
    for _ in range(ATTEMPTS):
        folder = Path(bundle).resolve()
        try:
            before = folder_identity(folder)
        except OSError as e:
            raise LlmkdError(f"{bundle}: not a readable bundle folder ({e.strerror})") from None
        try:
            rec = Recommender.from_pretrained(folder, backend, verify=True)
        except (LlmkdError, OSError):
            if Path(bundle).resolve() == folder and folder_identity_or_none(folder) == before:
                raise  # the folder did not change under the load: the bundle itself is bad
            continue
        if folder_identity_or_none(folder) == before and read_manifest(folder)["version"] == rec.version:
            return rec, folder
    raise LlmkdError(f"{bundle}: replaced {ATTEMPTS} times while it was being read; reload again once the "
                     "writer (llmkd add-items / export) has finished")


def folder_identity_or_none(folder: Path) -> tuple[int, int, int] | None:
    try:
        return folder_identity(folder)
    except OSError:
        return None


class ModelSlot:
    """The served bundle of one server process and its reloads. `current` is what new requests take;
    `reload()` loads `bundle` again in a thread beside it and swaps it in when it verifies. Concurrent
    reload requests share one load: a request that arrives while a load runs gets the next one, which starts
    after it (so it sees the bundle as it was when it asked). `on_swap(served)` runs after each swap
    (metrics)."""

    def __init__(self, bundle: str | Path, backend: str, rec: Recommender, folder: Path,
                 make_batcher: Callable[[Recommender], MicroBatcher],
                 on_swap: Callable[[Served], None] | None = None) -> None:
        self.bundle, self.backend, self.make_batcher, self.on_swap = Path(bundle), backend, make_batcher, on_swap
        self.current = Served(rec, make_batcher(rec), folder)
        self.waiters: list[asyncio.Future] = []
        self.task: asyncio.Task | None = None
        self.last: dict[str, Any] | None = None
        self.loading = False

    def reload(self) -> asyncio.Future:
        """A future of the outcome of a reload that starts after this call: {"status": "reloaded" |
        "unchanged" | "refused", "version", "previous", "error" (refused), "seconds"}."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiters.append(future)
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._run())
        return future

    async def _run(self) -> None:
        while self.waiters:
            waiters, self.waiters = self.waiters, []
            outcome = await self._reload_once()
            for w in waiters:
                if not w.done():
                    w.set_result(outcome)

    async def _reload_once(self) -> dict[str, Any]:
        old, t = self.current, time.perf_counter()
        base = {"previous": old.version, "bundle": str(self.bundle)}
        try:
            folder = self.bundle.resolve()
            recover_if_needed(folder)  # an add-items killed in its swap is finished (or undone) first
            claimed = read_manifest(folder)["version"]
            self.loading = True
            if claimed == old.version:  # nothing to load; a damaged copy on disk is still said (and refused)
                await asyncio.get_running_loop().run_in_executor(None, check_files, folder, True)
                return self._done({**base, "status": "unchanged", "version": old.version}, t)
            rec, folder = await asyncio.get_running_loop().run_in_executor(None, load_verified, self.bundle,
                                                                           self.backend)
        except (LlmkdError, OSError) as e:
            return self._done({**base, "status": "refused", "version": old.version, "error": str(e)}, t)
        finally:
            self.loading = False
        self.current = Served(rec, self.make_batcher(rec), folder)  # the swap: new requests take the new model
        gc.freeze()  # the new bundle joins the permanent generation, as at start (`http.frozen_app`)
        if self.on_swap is not None:
            self.on_swap(self.current)
        await old.batcher.close()  # the old model answers what it accepted, then its thread stops
        return self._done({**base, "status": "reloaded", "version": rec.version}, t)

    def _done(self, outcome: dict[str, Any], t: float) -> dict[str, Any]:
        self.last = {**outcome, "seconds": round(time.perf_counter() - t, 3), "pid": os.getpid()}
        return self.last
