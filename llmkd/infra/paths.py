"""User-given paths checked before use: one line naming the path and what was expected.

A folder where a file is expected, a file that cannot be read (a socket, no permission) or an `out_dir`
with a file in its place would otherwise fail deep inside pandas, datasets or `mkdir` with a traceback.
"""

from __future__ import annotations

from pathlib import Path

from llmkd.infra.errors import LlmkdError


def readable_file(path: str | Path, what: str = "file", missing_hint: str = "") -> Path:
    """`path` if it is a regular file that opens for reading; else LlmkdError saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise LlmkdError(f"{path}: is a folder; expected a {what}")
    if not path.exists():
        raise LlmkdError(f"{path}: {what} not found{missing_hint}")
    if not path.is_file():
        raise LlmkdError(f"{path}: cannot be read (not a regular file); expected a {what}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise LlmkdError(f"{path}: cannot be read ({e.strerror or e}); expected a {what}") from None
    return path


def folder_or_nothing(path: str | Path, what: str) -> Path:
    """`path` if it is a folder or can become one: neither it nor any folder above it is a file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise LlmkdError(f"{what} {path}: {p} is a file; expected a folder")
            break
    return path
