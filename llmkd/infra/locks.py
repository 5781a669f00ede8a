"""Artifact locks: one run at a time writes an artifact folder.

A stage that writes `out/student_kd` holds `out/.student_kd.lock` while it works on that artifact (a
student's lock also covers its `checkpoints/<name>/`). A second run that wants the same artifact fails
at once with one line naming the holder (pid, host, start, command), or waits for it when asked to:
`--wait-lock [SECONDS]` on every script, which sets `LLMKD_WAIT_LOCK` (inherited by worker processes
and by every process of `accelerate launch`).

The lock is `fcntl.flock` on that file, which the kernel drops when its holder dies, so a killed run
never blocks the next one and no guess about a process being alive decides who owns an artifact. The
file holds the owner's record (JSON) and is removed on release; a record found on taking the lock is
therefore the trace of a run that died holding it, and is reported as taken over. The `filelock`
package (already installed with torch) locks the same way but keeps the file forever (a hidden file
beside every artifact) and records no owner for its flock locks, so a refused run could not say which
run holds the artifact; its owner records and stale-lock detection belong to its soft (no-flock) locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from llmkd.infra.errors import LlmkdError, notice

WAIT_ENV = "LLMKD_WAIT_LOCK"
"""Seconds a run waits for a locked artifact before giving up ('inf': as long as it takes; unset: 0)."""
POLL_S = 0.2


def lock_path(folder: str | Path) -> Path:
    """The lock file of an artifact folder: a hidden sibling, `.NAME.lock`."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def wait_seconds() -> float:
    """The wait asked for through `LLMKD_WAIT_LOCK` (0 when unset)."""
    raw = os.environ.get(WAIT_ENV, "").strip()
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        raise LlmkdError(f"{WAIT_ENV}={raw!r}: expected seconds (a number, or 'inf')") from None
    if value < 0 or math.isnan(value):
        raise LlmkdError(f"{WAIT_ENV}={raw!r}: expected seconds >= 0")
    return value


def owner_record() -> dict:
    """Who holds a lock: pid, host, start time and command line."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:300]}


def read_owner(path: Path) -> dict:
    """The record in a lock file ({} when missing, empty or unreadable)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def is_mine(owner: dict) -> bool:
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def describe(owner: dict) -> str:
    if not owner:
        return "another run (owner not recorded yet)"
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}: {owner.get('command')}"


def _try_lock(path: Path) -> int | None:
    """Open and flock `path` without blocking: the descriptor, or None when another process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise LlmkdError(f"{path}: cannot create the lock file ({e.strerror}); is {path.parent} a writable folder?") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise LlmkdError(f"{path}: this filesystem does not support file locks ({e.strerror})") from None
        try:  # the holder we waited for may have removed the file: lock the file that is there now
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def artifact_lock(folder: str | Path, wait: float | None = None) -> Iterator[None]:
    """Hold the lock of artifact `folder` for the block; `wait` seconds (default `LLMKD_WAIT_LOCK`) for
    another run to release it, then one LlmkdError naming that run. Re-entrant within a process."""
    folder = Path(folder)
    path = lock_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlmkdError(f"{path.parent}: cannot create the folder for {folder.name} ({e.strerror})") from None
    wait = wait_seconds() if wait is None else wait
    deadline, said = time.monotonic() + wait, False
    while (fd := _try_lock(path)) is None:
        owner = read_owner(path)
        if is_mine(owner):  # this process holds it already (a stage writing through atomic_dir)
            yield
            return
        if time.monotonic() >= deadline:
            raise LlmkdError(f"{folder}: in use by {describe(owner)}; wait for that run to finish "
                             "(or pass --wait-lock to wait for it)")
        if not said:
            notice(f"{folder}: in use by {describe(owner)}; waiting")
            said = True
        time.sleep(POLL_S)
    try:
        stale = read_owner(path)
        if stale:
            notice(f"{folder}: took over the lock of {describe(stale)} (that run ended without releasing it)")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(owner_record()).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before unlocking: a waiter that locks the old file sees it is gone and retries
        os.close(fd)


def main_process_lock(accelerator, folder: str | Path) -> contextlib.AbstractContextManager:
    """The lock of `folder`, taken by the main process of a (possibly distributed) run. Every process
    learns the outcome, so a refused run stops everywhere with the same one-line error instead of
    leaving the other processes waiting in a collective for a main process that has gone."""
    from accelerate.utils import broadcast_object_list

    stack = contextlib.ExitStack()
    error = [None]
    if accelerator.is_main_process:
        try:
            stack.enter_context(artifact_lock(folder))
        except LlmkdError as e:
            error[0] = str(e)
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        raise LlmkdError(error[0])
    return stack


def locked(folder_of: Callable[[dict], str | Path]) -> Callable:
    """Decorator: the stage runs holding the lock of the artifact `folder_of(arguments)` names (its
    arguments by name, defaults applied), taken before any of its work, e.g.
    `@locked(lambda a: Path(a["cfg"].out_dir) / "eval")`."""
    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with artifact_lock(folder_of(bound.arguments)):
                return fn(*args, **kwargs)

        return run

    return wrap
