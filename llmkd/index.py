"""FAISS index over the student's item vectors (inner product = the student's score).

`index.type` 'flat' (exact), 'hnsw', 'ivf' or 'ivfpq', each built from a `faiss.index_factory` string
(`factory_string`) with its search knobs set through `faiss.ParameterSpace`, so they also reach an index
inside the serving bundle's `IndexIDMap`. With `index.ip_to_l2` the approximate types search by L2 over
extended vectors (`MipsIndex`). `scripts/ann_sweep.py` (`llmkd.evaluation.ann`) measures both and chooses among them.

Artifact `index/`: faiss.index (+ faiss.index.json for a `MipsIndex`), item_ids.json (FAISS row ->
original item id), meta.json. Read and write indexes with `read_index` / `write_index`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from llmkd.infra.artifacts import LlmkdError, StageTimer, atomic_dir, new_meta, read_meta, reading, write_json
from llmkd.infra.config import IndexConfig
from llmkd.infra.lineage import input_record


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


MIPS_SUFFIX = ".json"
"""A `MipsIndex` is written as its inner FAISS index plus this file beside it:
{"ip_to_l2": {"max_norm": M, "dim": d}}."""


class NormAboveMax(LlmkdError):
    """Vectors longer than a `MipsIndex`'s max_norm: the index must be rebuilt over all vectors to take them."""


class MipsIndex:
    """Maximum inner-product search through an L2 index: the reduction of Bachrach et al. (2014, "Speeding
    up the Xbox recommender system using a Euclidean transformation for inner-product spaces").

    Each stored vector x gets one more coordinate sqrt(M^2 - |x|^2), M the largest norm among them, and each
    query q a 0, so |q - x'|^2 = |q|^2 + M^2 - 2 q.x: the L2 order is the inner-product order, and every
    stored vector has norm M. FAISS's inner-product HNSW and IVF assume norms alike (its IVF even assigns
    by the inner product with centroids), while a recommender's item norms are not: long vectors are the
    popular items every user scores high. `search` takes d-dim queries and returns inner products (up to
    float32 rounding of the L2 distances). Attributes it does not define (`hnsw`, `nlist`, ...) are the
    inner index's; `inner` is the FAISS index itself (an `IndexIDMap` in a serving bundle)."""

    def __init__(self, inner: faiss.Index | None, max_norm: float, dim: int, width: int | None = None) -> None:
        """`inner` holds vectors of `width` (default: inner.d) >= dim + 1 columns: x, the completing
        coordinate, zeros (an 'ivfpq' needs a width its sub-quantizers divide)."""
        self.inner, self.max_norm, self.dim = inner, float(max_norm), int(dim)
        self.width = int(width if width is not None else inner.d)
        if self.width <= self.dim:
            raise LlmkdError(f"MipsIndex: width {self.width} must exceed the vector dimension {self.dim}")

    def __getattr__(self, name: str):
        if name in ("inner", "this"):  # 'this' is SWIG's pointer: FAISS functions get `faiss_index(index)`,
            raise AttributeError(name)  # so faiss.write_index cannot drop the max_norm silently
        return getattr(self.inner, name)

    @property
    def d(self) -> int:
        return self.dim

    @staticmethod
    def norm_bound(xb: np.ndarray) -> float:
        """The M for vectors xb (n, d): their largest norm (1 for none or all zero)."""
        norms = np.linalg.norm(xb, axis=1) if len(xb) else np.zeros(0)
        return float(norms.max()) if len(norms) and norms.max() > 0 else 1.0

    def extend(self, xb: np.ndarray) -> np.ndarray:
        """xb (n, d) -> (n, d + 1) with the completing coordinate; `NormAboveMax` for a vector longer than M."""
        xb = np.asarray(xb, dtype=np.float32)
        sq = np.einsum("ij,ij->i", xb, xb, dtype=np.float64)
        over = np.flatnonzero(sq > self.max_norm ** 2 * (1 + 1e-6))
        if len(over):
            raise NormAboveMax(f"{len(over)} vector(s) longer than the index's max_norm {self.max_norm:.4g} (row "
                               f"{over[0]}: {np.sqrt(sq[over[0]]):.4g}); rebuild the index over all vectors")
        out = np.zeros((len(xb), self.width), dtype=np.float32)
        out[:, : self.dim] = xb
        out[:, self.dim] = np.sqrt(np.maximum(self.max_norm ** 2 - sq, 0.0))
        return out

    def add(self, xb: np.ndarray) -> None:
        self.inner.add(self.extend(xb))

    def add_with_ids(self, xb: np.ndarray, ids: np.ndarray) -> None:
        self.inner.add_with_ids(self.extend(xb), ids)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product of xq (nq, d): D (nq, k) float32 inner products, I (nq, k) (-1: none)."""
        xq = np.asarray(xq, dtype=np.float32)
        wide = np.zeros((len(xq), self.width), dtype=np.float32)
        wide[:, : self.dim] = xq
        D, I = self.inner.search(wide, k)
        sq = np.einsum("ij,ij->i", xq, xq, dtype=np.float64)[:, None]
        ip = ((sq + self.max_norm ** 2 - D.astype(np.float64)) / 2).astype(np.float32)
        return np.where(I < 0, -np.inf, ip).astype(np.float32), I


def faiss_index(index: faiss.Index | MipsIndex) -> faiss.Index:
    """The FAISS index itself (a `MipsIndex`'s inner one)."""
    return index.inner if isinstance(index, MipsIndex) else index


def write_index(index: faiss.Index | MipsIndex, path: str | Path) -> None:
    """`faiss.write_index`, plus path + '.json' holding a `MipsIndex`'s max_norm."""
    faiss.write_index(faiss_index(index), str(path))
    if isinstance(index, MipsIndex):
        write_json(Path(f"{path}{MIPS_SUFFIX}"), {"ip_to_l2": {"max_norm": index.max_norm, "dim": index.dim}})


def read_index(path: str | Path) -> faiss.Index | MipsIndex:
    """What `write_index` wrote (a clear `LlmkdError` naming the file when it cannot be read)."""
    with reading(Path(path), "FAISS index"):
        index = faiss.read_index(str(path))
    side = Path(f"{path}{MIPS_SUFFIX}")
    if side.is_file():
        with reading(side, "MIPS reduction record"):
            record = json.loads(side.read_text(encoding="utf-8"))["ip_to_l2"]
            index = MipsIndex(index, float(record["max_norm"]), int(record["dim"]))
    return index


def set_search_parameters(index: faiss.Index | MipsIndex, cfg: IndexConfig) -> None:
    """Apply cfg's search knobs to a built index of cfg's type (also inside an `IndexIDMap` or a
    `MipsIndex`), with FAISS's `ParameterSpace`; they are saved with the index."""
    index = faiss_index(index)
    ivf = faiss.try_extract_index_ivf(index)
    params = search_parameters(cfg, ivf.nlist if ivf is not None else None)
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def uses_l2(cfg: IndexConfig) -> bool:
    """Whether cfg's index searches through the L2 reduction (`MipsIndex`): approximate types with ip_to_l2."""
    return cfg.ip_to_l2 and cfg.type != "flat"


def empty_index(d: int, cfg: IndexConfig, xt: np.ndarray) -> faiss.Index | MipsIndex:
    """An empty index for d-dim vectors by inner product described by cfg (`factory_string`), trained on xt
    (n, d) float32 when its type needs training, with cfg's search parameters set. With `uses_l2(cfg)` it
    is a `MipsIndex` whose max_norm is xt's largest norm (so xt must be the catalog, or stand for it)."""
    if cfg.type == "ivfpq" and len(xt) < 2 ** cfg.pq_nbits:
        raise LlmkdError(f"index.type 'ivfpq': {len(xt)} items cannot train {2 ** cfg.pq_nbits} codes per "
                         f"sub-quantizer (pq_nbits {cfg.pq_nbits}); lower index.pq_nbits or use 'flat'")
    metric, factory = faiss.METRIC_INNER_PRODUCT, factory_string(d, len(xt), cfg)
    mips = None
    if uses_l2(cfg):  # one more coordinate; 'ivfpq': one more sub-vector, so the sub-quantizers still divide
        extra = d // pq_m(d, cfg) if cfg.type == "ivfpq" else 1
        mips = MipsIndex(None, MipsIndex.norm_bound(xt), d, d + extra)
        xt, metric = mips.extend(xt), faiss.METRIC_L2
        factory = factory_string(d + extra, len(xt), dataclasses.replace(cfg, pq_m=pq_m(d, cfg) + 1))
    index = faiss.index_factory(xt.shape[1], factory, metric)
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
    if mips is None:
        return index
    mips.inner = index
    return mips


def build_index(xb: np.ndarray, cfg: IndexConfig) -> faiss.Index | MipsIndex:
    """An index by inner product over xb (n, d) float32 of `cfg.type` (`empty_index`); FAISS ids = rows."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    index = empty_index(xb.shape[1], cfg, xb)
    index.add(xb)
    return index


def build_id_index(xb: np.ndarray, cfg: IndexConfig) -> faiss.IndexIDMap | MipsIndex:
    """`build_index` inside an `IndexIDMap` whose ids are the rows of xb (n, d) float32: the explicit id
    map a serving bundle needs, so new items can be appended with `add_with_ids` (any inner type; a
    `MipsIndex` holds the `IndexIDMap`)."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    index = empty_index(xb.shape[1], cfg, xb)
    if isinstance(index, MipsIndex):
        index.inner = faiss.IndexIDMap(index.inner)
    else:
        index = faiss.IndexIDMap(index)
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
    fingerprint is recorded when it is there (`llmkd.infra.lineage`)."""
    source = Path(folder).parent / student
    inputs = {"student": input_record(Path(folder).parent, source)} if (source / "meta.json").is_file() else {}
    with atomic_dir(folder) as tmp:
        write_index(index, tmp / "faiss.index")
        write_json(tmp / "item_ids.json", item_ids)
        write_json(tmp / "meta.json", new_meta("index", asdict(cfg), data_fingerprint, student=student,
                                               inputs=inputs,
                                               ntotal=int(index.ntotal), dim=int(index.d),
                                               timing=timer.as_dict() if timer else None))


def load_index(folder: str | Path) -> tuple[faiss.Index | MipsIndex, list[str], dict]:
    """Read `index/`: the FAISS index, its item-id map and meta."""
    folder = Path(folder)
    meta = read_meta(folder, "index")
    index = read_index(folder / "faiss.index")
    with reading(folder / "item_ids.json", "item id list"):
        item_ids = json.loads((folder / "item_ids.json").read_text(encoding="utf-8"))
    if len(item_ids) != index.ntotal:
        raise LlmkdError(f"{folder}: item_ids.json has {len(item_ids)} ids but the index holds {index.ntotal}")
    return index, item_ids, meta
