"""Teacher encoding in shards: bounded memory, resumable after a kill, shared out across processes.

A part (the item texts, the history texts of one state, the KD positions) is cut into shards of
`teacher.shard_size` rows. Each shard's texts are rendered, tokenized and encoded on their own and
written as one safetensors file (`emb`: (rows, d) float32) through a temporary name and a rename, so
a shard on disk is always complete. Under `accelerate launch --num_processes N` the unfinished shards
are split between the processes (`PartialState.split_between_processes`); the results are gathered
through the shard files, which the main process reads back in order. A shard's vectors depend only on
its own texts, so N processes write the same bytes as one.

The shards live beside the cache in `.<name>.shards/<key>/`, `key` a hash of everything the vectors
depend on (model, adapter and data fingerprints, teacher settings, shard size): a rerun with the same
inputs reuses the finished shards, one with other inputs starts afresh. The folder is removed once
the cache is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

SHARD_PAUSE_ENV = "LLMKD_TEST_PAUSE_AFTER_SHARD"
"""Test hook: a file path. After writing its first shard, a process writes that file and sleeps, so a
test can kill the run between shards."""


@dataclass(frozen=True)
class Part:
    """Rows to encode: `texts(lo, hi)` renders rows [lo, hi) as strings, cut at `max_length` tokens."""

    name: str
    rows: int
    texts: Callable[[int, int], list[str]]
    max_length: int


def shards_root(folder: Path) -> Path:
    """Where the shards of cache `folder` live while it is being built: `.<name>.shards/`."""
    return folder.parent / f".{folder.name}.shards"


def key_hash(key: dict) -> str:
    """16 hex digits of SHA-256 over a JSON-serialisable key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_path(root: Path, part: str, index: int) -> Path:
    return root / f"{part}-{index:05d}.safetensors"


def shard_done(path: Path, rows: int) -> bool:
    """True when `path` is a finished shard of `rows` rows (reads the header only)."""
    try:
        with safe_open(str(path), "np") as f:
            return f.get_slice("emb").get_shape()[0] == rows
    except (OSError, SafetensorError):  # missing, or not a safetensors file: encode it again
        return False


def write_shard(path: Path, emb: np.ndarray) -> None:
    """Write one shard atomically: a temporary name in the same folder, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"emb": np.ascontiguousarray(emb, dtype=np.float32)}, str(tmp))
    os.replace(tmp, path)


def _pause_for_tests(path: Path) -> None:
    signal = os.environ.get(SHARD_PAUSE_ENV)
    if signal:
        Path(signal).write_text(str(path), encoding="utf-8")
        time.sleep(600)


def bounds(rows: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) of each shard of `rows` rows cut every `size`."""
    return [(lo, min(lo + size, rows)) for lo in range(0, rows, size)]


def encode_parts(encoder, parts: list[Part], folder: Path, key: dict, shard_size: int, state,
                 force: bool = False) -> tuple[dict[str, np.ndarray] | None, dict]:
    """Encode every part in shards -> ({part name: (rows, d) float32} on the main process, None elsewhere;
    {"shards", "reused", "shard_size", "processes"}). Every process of `state` (an accelerate
    `PartialState`) must call it; call it holding the cache's lock."""
    from accelerate.utils import broadcast_object_list

    root = shards_root(folder) / key_hash({**key, "shard_size": shard_size})
    if state.is_main_process:
        if shards_root(folder).is_dir():
            for other in shards_root(folder).iterdir():  # shards made from other inputs: never reused
                if other != root or force:
                    shutil.rmtree(other, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    total = reused = 0
    for part in parts:
        shards = bounds(part.rows, shard_size)
        todo = [None]
        if state.is_main_process:
            todo[0] = [i for i, (lo, hi) in enumerate(shards) if not shard_done(shard_path(root, part.name, i), hi - lo)]
        if state.num_processes > 1:
            broadcast_object_list(todo)
        todo = todo[0]
        total, reused = total + len(shards), reused + len(shards) - len(todo)
        with state.split_between_processes(todo) as mine:
            bar = tqdm(mine, desc=f"teacher: {part.name} ({len(shards)} shards, {len(shards) - len(todo)} done)",
                       unit="shard", disable=not state.is_local_main_process or not mine)
            for i in bar:
                lo, hi = shards[i]
                desc = f"teacher: {part.name} shard {i + 1}/{len(shards)}" if state.is_local_main_process else None
                emb = encoder.encode(part.texts(lo, hi), part.max_length, desc=desc)  # a bar per batch within the shard
                write_shard(shard_path(root, part.name, i), emb)
                _pause_for_tests(shard_path(root, part.name, i))
        state.wait_for_everyone()
    stats = {"shards": total, "reused": reused, "shard_size": shard_size, "processes": state.num_processes}
    if not state.is_main_process:
        return None, stats
    out = {}
    for part in parts:
        pieces = [load_file(str(shard_path(root, part.name, i)))["emb"] for i in range(len(bounds(part.rows, shard_size)))]
        out[part.name] = np.concatenate(pieces) if pieces else np.zeros((0, encoder.dim), np.float32)
        assert out[part.name].shape == (part.rows, encoder.dim), (part.name, out[part.name].shape)
    return out, stats


def remove_shards(folder: Path) -> None:
    """Drop the shards of cache `folder` once the cache itself is written."""
    shutil.rmtree(shards_root(folder), ignore_errors=True)
