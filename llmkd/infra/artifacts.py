"""Artifact folders: atomic writes, a `meta.json` that says what made them, and user-facing errors.

Every stage writes one folder. It is built in a temporary sibling and renamed into place, so a crash
leaves either the previous artifact or the new one, never a half-written one. `meta.json` records the
stage, its config, the data fingerprint and library versions; readers check it before trusting the
folder.

A run killed inside `atomic_dir` leaves hidden siblings (`.NAME.tmp-PID`, `.NAME.old-PID`) and, between
the swap's two renames, no artifact at all; the next run that writes or reads the artifact repairs
that (`recover`) and says what it did in one line.

`LlmkdError` and `notice` are defined in `llmkd.infra.errors`, below `llmkd.infra.locks`, and re-exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkd.infra.errors import LlmkdError, notice
from llmkd.infra.locks import artifact_lock, lock_path
from llmkd.infra.paths import folder_or_nothing

META_FILE = "meta.json"


SWAP_PAUSE_ENV = "LLMKD_TEST_PAUSE_IN_SWAP"
"""Test hook: a file path. `atomic_dir` writes it between the two renames of a swap, then sleeps, so a
test can kill the process exactly there."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour an artifact depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("llmkd", "torch", "transformers", "accelerate", "peft", "datasets", "faiss-cpu", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def hash_files(paths: list[Path], extra: Any = None) -> str:
    """SHA-256 over file contents (in order) and a JSON-serialisable `extra`; first 16 hex digits."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def write_json(path: Path, obj: Any) -> None:
    """Write JSON with a trailing newline (UTF-8, indented)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def read_meta(folder: str | Path, stage: str) -> dict[str, Any]:
    """Load `folder/meta.json` and check it was written by `stage`."""
    folder = Path(folder)
    recover_if_needed(folder)
    path = folder / META_FILE
    if not path.is_file():
        raise LlmkdError(f"{folder}: not a {stage} artifact (no {META_FILE}); run the {stage} stage first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmkdError(f"{path}: unreadable JSON ({e})") from None
    if meta.get("stage") != stage:
        raise LlmkdError(f"{path}: expected a '{stage}' artifact, found '{meta.get('stage')}'")
    return meta


@contextlib.contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """Turn any failure to read `path` (missing, truncated, corrupt) into one LlmkdError naming it."""
    try:
        yield
    except LlmkdError:
        raise
    except Exception as e:  # safetensors, JSON, FAISS and OS errors all mean the same: rebuild the artifact
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        detail = re.sub(r"^Error in .* at \S+:\d+: ", "", detail)[:200]  # FAISS: drop the C++ location
        raise LlmkdError(f"{path}: unreadable {what} ({detail}); rebuild it") from None


def check_replaceable(final: str | Path) -> Path:
    """`final` if `atomic_dir` may replace it: nothing there, or a real folder (an earlier artifact), under
    folders. A user's file there would be moved aside and then fail to be deleted (and a link would be
    replaced, not followed): one LlmkdError instead, and the path is left as it is."""
    final = Path(final)
    if final.is_symlink():
        raise LlmkdError(f"{final}: is a symbolic link; an artifact folder is replaced whole, which would replace "
                         "the link, not what it points to: remove the link or write the artifact elsewhere")
    if final.exists() and not final.is_dir():
        raise LlmkdError(f"{final}: is a file; expected an artifact folder (or nothing) there; move the file or "
                         "write the artifact elsewhere")
    folder_or_nothing(final.parent, "folder")
    return final


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success replace `final` with it, on error delete it.

    Holds `final`'s lock throughout (`llmkd.infra.locks`; a stage that took it already keeps it) and first
    repairs what a killed run left there (`recover`). A file or a link at `final` is refused before
    anything is written (`check_replaceable`)."""
    final = check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with artifact_lock(final):
        recover(final)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():  # an earlier process with this pid
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
            _pause_for_tests(final)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)


def _pause_for_tests(final: Path) -> None:
    """The `SWAP_PAUSE_ENV` test hook: between the two renames, signal and sleep."""
    signal = os.environ.get(SWAP_PAUSE_ENV)
    if signal:
        Path(signal).write_text(str(final), encoding="utf-8")
        time.sleep(600)


def leftovers(final: str | Path) -> list[tuple[str, int, Path]]:
    """What killed runs of `atomic_dir(final)` left beside it: (kind 'tmp' or 'old', pid, path), by pid;
    never this process's own (a read inside its `atomic_dir` block must not touch its `.tmp-`)."""
    final = Path(final)
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(tmp|old)-(\d+)$")
    if not final.parent.is_dir():
        return []
    found = [(m[1], int(m[2]), p) for p in final.parent.iterdir()
             if (m := pattern.match(p.name)) and int(m[2]) != os.getpid()]
    return sorted(found, key=lambda x: (x[1], x[0]))


def recover(final: str | Path) -> None:
    """Repair `final` after a run killed inside `atomic_dir` (call it holding `final`'s lock).

    `.old-PID` is the previous artifact, moved aside by run PID just before it renamed its finished
    `.tmp-PID` into place. Without `final`, the swap was cut between the two renames: it is finished
    (the `.tmp-PID` of the same run is complete) or, failing that, undone (`.old-PID` restored). Every
    other `.tmp-` is a half-written artifact and every other `.old-` a swap whose clean-up was cut: both
    are removed. One line says what was done."""
    final = Path(final)
    found = leftovers(final)
    if not found:
        return
    done = []
    tmps = {pid: path for kind, pid, path in found if kind == "tmp"}
    for kind, pid, path in found:
        if kind == "old" and not final.exists():
            source = tmps.pop(pid, None) or path
            source.rename(final)
            done.append(f"finished the swap of pid {pid} (killed between its renames)" if source != path else
                        f"restored the previous artifact (pid {pid} was killed between its renames)")
    for kind, pid, path in found:
        if path.exists() and path != final:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}")
    notice(f"{final}: recovered from an interrupted write: " + "; ".join(done))


def recover_if_needed(final: str | Path) -> None:
    """`recover` for a reader: only when a killed run left something (leftovers, or its lock file, which
    taking the lock reports and removes) and no other run is writing `final` now."""
    if leftovers(final) or lock_path(final).exists():
        with contextlib.suppress(LlmkdError), artifact_lock(final, wait=0):
            recover(final)


class StageTimer:
    """Wall time and peak resident memory of a stage, for `meta.json` (`with StageTimer() as t:`)."""

    def __enter__(self) -> StageTimer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start

    @staticmethod
    def peak_rss_mb() -> float:
        """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def as_dict(self) -> dict[str, float]:
        return {"wall_seconds": round(self.seconds, 2), "peak_rss_mb": round(self.peak_rss_mb(), 1)}


def new_meta(stage: str, config: Any, data_fingerprint: str | None, **extra: Any) -> dict[str, Any]:
    """The standard `meta.json` body: stage, config, data fingerprint, versions, plus `extra`."""
    return {
        "stage": stage,
        "data_fingerprint": data_fingerprint,
        "config": config,
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
