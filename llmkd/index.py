"""FAISS index over the student's item vectors (inner product = the student's score).

`index.type` 'flat' (exact), 'hnsw', 'ivf' or 'ivfpq', each built from a `faiss.index_factory` string
(`factory_string`) with its search knobs set through `faiss.ParameterSpace`, so they also reach an index
inside the serving bundle's `IndexIDMap`. `scripts/ann_sweep.py` (`llmkd.ann`) chooses among them.

Artifact `index/`: faiss.index, item_ids.json (FAISS row -> original item id), meta.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from llmkd.artifacts import LlmkdError, StageTimer, atomic_dir, new_meta, read_meta, reading, write_json
from llmkd.config import IndexConfig
from llmkd.lineage import input_record


def ivf_nlist(n: int, cfg: IndexConfig) -> int:
    """Inverted lists for n training vectors: `cfg.ivf_nlist`, or round(4 * sqrt(n)) when unset (the usual
    rule: lists of ~sqrt(n) / 4 items), and never over n // 39 (FAISS wants ~39 training points per list)."""
    want = cfg.ivf_nlist if cfg.ivf_nlist is not None else round(4 * math.sqrt(n))
    return max(1, min(want, n // 39))


def pq_m(d: int, cfg: IndexConfig) -> int:
    """Sub-quantizers of an 'ivfpq' index: `cfg.pq_m`, or d / 2 (2 dimensions a byte) when unset."""
    m = cfg.pq_m if cfg.pq_m is not None else max(1, d // 2)
    if d % m:
        raise LlmkdError(f"index.pq_m: {m} does not divide the vector dimension {d}; choose a divisor of {d}")
    return m


def factory_string(d: int, n: int, cfg: IndexConfig) -> str:
    """The `faiss.index_factory` description of cfg for n (training) vectors of dimension d."""
    if cfg.type == "flat":
        return "Flat"
    if cfg.type == "hnsw":
        return f"HNSW{cfg.hnsw_m}"
    if cfg.type == "ivf":
        return f"IVF{ivf_nlist(n, cfg)},Flat"
    refine = ",RFlat" if cfg.pq_refine else ""
    return f"IVF{ivf_nlist(n, cfg)},PQ{pq_m(d, cfg)}x{cfg.pq_nbits}{refine}"


def search_parameters(cfg: IndexConfig, nlist: int | None = None) -> str:
    """cfg's search-time knobs in `faiss.ParameterSpace` syntax ('' for flat); nprobe is clamped to
    nlist when given (FAISS visits at most nlist lists anyway)."""
    nprobe = cfg.ivf_nprobe if nlist is None else min(cfg.ivf_nprobe, nlist)
    if cfg.type == "hnsw":
        return f"efSearch={cfg.hnsw_ef_search}"
    if cfg.type == "ivf":
        return f"nprobe={nprobe}"
    if cfg.type == "ivfpq":
        return f"nprobe={nprobe}" + (f",k_factor_rf={cfg.pq_refine}" if cfg.pq_refine else "")
    return ""


def set_search_parameters(index: faiss.Index, cfg: IndexConfig) -> None:
    """Apply cfg's search knobs to a built index of cfg's type (also inside an `IndexIDMap`), with
    FAISS's `ParameterSpace`; they are saved with the index."""
    ivf = faiss.try_extract_index_ivf(index)
    params = search_parameters(cfg, ivf.nlist if ivf is not None else None)
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def empty_index(d: int, cfg: IndexConfig, xt: np.ndarray) -> faiss.Index:
    """An empty inner-product index of dimension d described by cfg (`factory_string`), trained on xt
    (n, d) float32 when its type needs training, with cfg's search parameters set."""
    if cfg.type == "ivfpq" and len(xt) < 2 ** cfg.pq_nbits:
        raise LlmkdError(f"index.type 'ivfpq': {len(xt)} items cannot train {2 ** cfg.pq_nbits} codes per "
                         f"sub-quantizer (pq_nbits {cfg.pq_nbits}); lower index.pq_nbits or use 'flat'")
    index = faiss.index_factory(d, factory_string(d, len(xt), cfg), faiss.METRIC_INNER_PRODUCT)
    if cfg.type == "hnsw":
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.max_points_per_centroid = cfg.ivf_train_per_list
        if cfg.type == "ivfpq":  # polysemous codes serve Hamming filtering, which search here never uses
            faiss.downcast_index(ivf).do_polysemous_training = False
    if not index.is_trained:
        index.train(np.ascontiguousarray(xt, dtype=np.float32))
    set_search_parameters(index, cfg)
    return index


def build_index(xb: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """An inner-product index over xb (n, d) float32 of `cfg.type` (`empty_index`); FAISS ids = rows."""
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
