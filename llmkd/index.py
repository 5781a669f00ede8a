"""FAISS index over the student's item vectors (inner product = the student's score).

Artifact `index/`: faiss.index, item_ids.json (FAISS row -> original item id), meta.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from llmkd.artifacts import LlmkdError, StageTimer, atomic_dir, new_meta, read_meta, reading, write_json
from llmkd.config import IndexConfig
from llmkd.lineage import input_record


def empty_index(d: int, cfg: IndexConfig, xt: np.ndarray) -> faiss.Index:
    """An empty inner-product index of dimension d: exact ('flat'), HNSW or IVF (trained on xt (n, d) float32)."""
    if cfg.type == "flat":
        return faiss.IndexFlatIP(d)
    if cfg.type == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = cfg.hnsw_ef_search
        return index
    nlist = max(1, min(cfg.ivf_nlist, len(xt) // 39))  # FAISS wants ~39 training points per list
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(xt, dtype=np.float32))
    index.nprobe = min(cfg.ivf_nprobe, nlist)
    return index


def build_index(xb: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """An inner-product index over xb (n, d) float32: exact ('flat'), HNSW or IVF; FAISS ids = rows."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    index = empty_index(xb.shape[1], cfg, xb)
    index.add(xb)
    return index


def build_id_index(xb: np.ndarray, cfg: IndexConfig) -> faiss.IndexIDMap:
    """`build_index` inside an `IndexIDMap` whose ids are the rows of xb (n, d) float32: the explicit id
    map a serving bundle needs, so new items can be appended with `add_with_ids` (any inner type)."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    index = faiss.IndexIDMap(empty_index(xb.shape[1], cfg, xb))
    index.add_with_ids(xb, np.arange(len(xb), dtype=np.int64))
    return index


def search(index: faiss.Index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: D (nq, k) float32, I (nq, k) int64 (-1 where fewer than k)."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    assert xq.ndim == 2 and xq.shape[1] == index.d, (xq.shape, index.d)
    return index.search(xq, min(k, index.ntotal))


def save_index(index: faiss.Index, item_ids: list[str], folder: str | Path, cfg: IndexConfig,
               data_fingerprint: str, student: str, timer: StageTimer | None = None) -> None:
    """Write `index/` atomically; `student` names the student folder beside it (in out_dir), whose
    fingerprint is recorded when it is there (`llmkd.lineage`)."""
    source = Path(folder).parent / student
    inputs = {"student": input_record(Path(folder).parent, source)} if (source / "meta.json").is_file() else {}
    with atomic_dir(folder) as tmp:
        faiss.write_index(index, str(tmp / "faiss.index"))
        write_json(tmp / "item_ids.json", item_ids)
        write_json(tmp / "meta.json", new_meta("index", asdict(cfg), data_fingerprint, student=student,
                                               inputs=inputs,
                                               ntotal=int(index.ntotal), dim=int(index.d),
                                               timing=timer.as_dict() if timer else None))


def load_index(folder: str | Path) -> tuple[faiss.Index, list[str], dict]:
    """Read `index/`: the FAISS index, its item-id map and meta."""
    folder = Path(folder)
    meta = read_meta(folder, "index")
    with reading(folder / "faiss.index", "FAISS index"):
        index = faiss.read_index(str(folder / "faiss.index"))
    with reading(folder / "item_ids.json", "item id list"):
        item_ids = json.loads((folder / "item_ids.json").read_text(encoding="utf-8"))
    if len(item_ids) != index.ntotal:
        raise LlmkdError(f"{folder}: item_ids.json has {len(item_ids)} ids but the index holds {index.ntotal}")
    return index, item_ids, meta
