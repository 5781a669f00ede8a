"""The Python API over a bundle: `Recommender.from_pretrained(folder).recommend(history, k)`.

A history (item ids, oldest first) becomes a user vector through the student's user tower. With a flat
(exact) index the catalog is scored as one matrix product over the index's own vectors, the user's seen
items (and `exclude`) set to -inf and the top k taken: the offline evaluation's ranking (full catalog, seen
items masked), without over-fetching. Any other index returns the items with the highest dot product,
over-fetched by the number of excluded items so that k remain after they are removed. An empty history gets the most popular
train items. Imports torch, faiss and safetensors only (through `llmkd.student`).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from llmkd.index import MipsIndex, read_index
from llmkd.infra.artifacts import LlmkdError, reading
from llmkd.serving.bundle import INDEX, ITEM_IDS, POPULARITY, STUDENT, read_bundle
from llmkd.student import TwoTower, first_real_column

UNKNOWN_POLICIES = ("error", "drop")
EXACT_BLOCK = 1 << 24
"""Scores held at once by the exact path (queries x items, float32: 64 MiB); larger batches go in chunks."""
LENGTH_BUCKETS = np.array([4, 8, 16, 32])
"""History-length groups served as separate passes (<= 4, 5-8, 9-16, 17-32, longer): cost follows length."""
BUCKETS_ABOVE = 64
"""Batches of up to this many histories run as one padded pass: there the cost per pass dominates (ml-100k
transformer student, 16 histories: 1.6 ms in one pass, 3.2 ms by length group); larger batches go by
length group, where padding dominates (256 histories: 15 ms by group, 28-34 ms in one pass). A mean-pooling
tower always runs one pass: its per-position cost is a weighted row sum (47.5k vs 44.0k users/s at 256)."""


_onednn_lock = threading.Lock()
_onednn_users = 0
_onednn_saved = True


@contextmanager
def without_onednn() -> Iterator[None]:
    """Run the user tower with oneDNN off (`torch.backends.mkldnn.enabled`): on CPU, torch's GELU goes through a
    oneDNN kernel that is JIT-compiled and cached per input shape, and a server sees hundreds of (batch,
    length) shapes: its memory grew for minutes (ml-100k, 2 workers, not settled: results/serving_load_cpu_workers2_rss.json), and a
    new shape's first call pays the compile. Off, GELU is ATen's vectorised kernel: no cache, slower on large
    tensors and faster on small ones; end to end within a few per cent (results/serving_memory_cpu.json, docs/serving-usage.md). The flag is process-wide: overlapping calls (threads) share one
    save-and-restore, so it is back as it was when the last one leaves."""
    global _onednn_users, _onednn_saved
    with _onednn_lock:
        if _onednn_users == 0:
            _onednn_saved = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
        _onednn_users += 1
    try:
        yield
    finally:
        with _onednn_lock:
            _onednn_users -= 1
            if _onednn_users == 0:
                torch.backends.mkldnn.enabled = _onednn_saved


class BadRequest(LlmkdError):
    """A request the bundle cannot answer as asked; `field` names the argument ('k', 'history', ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownItems(BadRequest):
    """Item ids that are not in the bundle's vocabulary; `ids` lists them (in request order)."""

    def __init__(self, field: str, ids: list[str], catalog: int, droppable: bool = True) -> None:
        shown = ", ".join(repr(i) for i in ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        super().__init__(field, f"unknown item id{'s' if len(ids) > 1 else ''} {shown} (not among the bundle's "
                                f"{catalog} items)" + ("; pass unknown='drop' to ignore unknown ids" if droppable else ""))
        self.ids = ids


class Recommender:
    """A loaded bundle: student towers, vocabulary, popularity and FAISS index; `version` is the bundle's
    version id (its manifest's, `llmkd.serving.manifest`)."""

    def __init__(self, model: TwoTower, item_ids: list[str], popularity: np.ndarray, index: faiss.Index | MipsIndex,
                 config: dict[str, Any], user_tower: Callable[[torch.Tensor], np.ndarray] | None = None,
                 version: str | None = None) -> None:
        n = model.num_items
        if not (len(item_ids) == len(popularity) == index.ntotal == n):
            raise LlmkdError(f"bundle: sizes disagree: {len(item_ids)} ids, {len(popularity)} popularity counts, "
                             f"{index.ntotal} indexed vectors, {n} student items; re-export it")
        self.model, self.item_ids, self.index, self.config = model.eval(), item_ids, index, config
        self.user_tower = user_tower  # padded histories -> user vectors instead of torch (the ONNX graph)
        self.version = version
        self.row = {item: r for r, item in enumerate(item_ids)}
        self.popularity = np.asarray(popularity, dtype=np.float32)
        self.by_popularity = np.argsort(-self.popularity, kind="stable")  # ties to the lower row
        model.requires_grad_(False)
        with torch.inference_mode():  # detached: an id-only item tower returns its embedding parameter itself
            self.table = model.item_tower().detach()  # (N + 1, d): item vectors + the zero padding row
        self.exact = exact_vectors(index)  # (xb (N, d), vocabulary row of each) for a flat index, else None
        if self.exact is not None:
            self.exact_pos = np.empty(len(self.exact[1]), dtype=np.int64)  # vocabulary row -> position in xb
            self.exact_pos[self.exact[1]] = np.arange(len(self.exact[1]))

    @classmethod
    def from_pretrained(cls, folder: str | Path, backend: str = "torch", verify: bool = False) -> Recommender:
        """Load a bundle written by `export_bundle` (`scripts/export.py`). `backend` 'onnx' computes user
        vectors with the bundle's ONNX graph through ONNX Runtime (`llmkd export-onnx` writes it). The files
        are checked against the bundle's manifest first: sizes always, SHA-256 too with `verify`."""
        folder = Path(folder)
        if backend not in ("torch", "onnx"):
            raise LlmkdError(f"backend {backend!r}: expected 'torch' or 'onnx'")
        from llmkd.serving.onnx import ONNX_FILE, OnnxUserTower

        if backend == "onnx" and not (folder / ONNX_FILE).is_file():
            raise LlmkdError(f"{folder}: no {ONNX_FILE}; write it with `llmkd export-onnx {folder}`")
        config, version = read_bundle(folder, full=verify)
        user_tower = OnnxUserTower(folder / ONNX_FILE) if backend == "onnx" else None
        model = TwoTower.from_pretrained(folder / STUDENT)
        with reading(folder / ITEM_IDS, "item vocabulary"):
            item_ids = json.loads((folder / ITEM_IDS).read_text(encoding="utf-8"))
        with reading(folder / POPULARITY, "popularity"):
            popularity = np.asarray(json.loads((folder / POPULARITY).read_text(encoding="utf-8")), dtype=np.float32)
        index = read_index(folder / INDEX)
        return cls(model, item_ids, popularity, index, config, user_tower, version)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def metadata(self) -> dict[str, Any]:
        """The bundle's config (counts, dims, index, text path, metrics) and version, as served by GET /metadata."""
        return {**self.config, "num_items": self.num_items, "version": self.version}

    # ---------------------------------------------------------------- checks

    def check_k(self, k: Any, field: str = "k") -> int:
        """k as an int in [1, catalog size], else `BadRequest` naming `field`."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise BadRequest(field, f"expected an integer, got {type(k).__name__} {k!r}")
        if not 1 <= k <= self.num_items:
            raise BadRequest(field, f"expected 1 <= {field} <= {self.num_items} (the catalog size), got {k}")
        return int(k)

    def rows(self, ids: Sequence[str] | None, field: str, unknown: str = "error") -> np.ndarray:
        """Item ids -> vocabulary rows (n,) int64; unknown ids raise `UnknownItems` or are dropped."""
        if unknown not in UNKNOWN_POLICIES:
            raise BadRequest("unknown", f"expected one of {UNKNOWN_POLICIES}, got {unknown!r}")
        if ids is None:
            return np.zeros(0, dtype=np.int64)
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise BadRequest(field, f"expected a list of item ids, got {type(ids).__name__}")
        try:  # the common case at C speed: every id a key of the vocabulary (so a string)
            return np.fromiter(map(self.row.__getitem__, ids), dtype=np.int64, count=len(ids))
        except (KeyError, TypeError):
            pass
        for i, item in enumerate(ids):
            if not isinstance(item, str):
                raise BadRequest(f"{field}[{i}]", f"expected a string item id, got {type(item).__name__} {item!r}")
        found = [self.row.get(item, -1) for item in ids]
        missing = [item for item, r in zip(ids, found) if r < 0]
        if missing and unknown == "error":
            raise UnknownItems(field, list(dict.fromkeys(missing)), self.num_items)
        return np.asarray([r for r in found if r >= 0], dtype=np.int64)

    def _batch_rows(self, histories: Sequence[Sequence[str]]) -> list[np.ndarray] | None:
        """Every history's rows in one pass over all ids (at batch 256 a call per history cost more than the
        lookups); None when any history is not a list / tuple of known ids (`rows` then says which)."""
        if not all(type(h) in (list, tuple) for h in histories):
            return None
        lengths = [len(h) for h in histories]
        try:
            flat = np.fromiter(map(self.row.__getitem__, itertools.chain.from_iterable(histories)), dtype=np.int64,
                               count=sum(lengths))
        except (KeyError, TypeError):
            return None
        return np.split(flat, np.cumsum(lengths)[:-1]) if histories else []

    def check_request(self, history: Sequence[str], k: int, exclude: Sequence[str] | None = None,
                      unknown: str = "error") -> None:
        """Raise the `BadRequest` that `recommend(history, k, exclude, unknown=unknown)` would, without
        any model work (the HTTP service checks a request before it joins a batch)."""
        self.check_k(k)
        self.rows(history, "history", unknown)
        self.rows(exclude, "exclude", unknown)

    # ---------------------------------------------------------------- queries

    def recommend(self, history: Sequence[str], k: int = 10, exclude: Sequence[str] | None = None,
                  exclude_seen: bool = True, unknown: str = "error") -> dict[str, list]:
        """Top-k items for one history (oldest first): {'items': [ids], 'scores': [floats]}, best first.

        Seen items are excluded unless `exclude_seen=False`; `exclude` removes more. Unknown ids are an
        error (`UnknownItems`) unless `unknown='drop'`. An empty history gets the most popular items."""
        excl = None if exclude is None else [exclude]
        return self.recommend_batch([history], k, excl, exclude_seen, unknown, field="history")[0]

    def recommend_batch(self, histories: Sequence[Sequence[str]], k: int = 10,
                        exclude: Sequence[Sequence[str] | None] | None = None, exclude_seen: bool = True,
                        unknown: str = "error", field: str = "histories") -> list[dict[str, list]]:
        """`recommend` for many histories at once (one user-tower pass, one index search); `exclude` is
        None or one list (or None) per history."""
        k = self.check_k(k)
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
            raise BadRequest(field, f"expected a list of histories, got {type(histories).__name__}")
        if exclude is not None and len(exclude) != len(histories):
            raise BadRequest("exclude", f"expected one list per history ({len(histories)}), got {len(exclude)}")
        one = field == "history"
        hists = self._batch_rows(histories)
        if hists is None:  # something to refuse or drop: history by history, so the error names its place
            hists = [self.rows(h, field if one else f"{field}[{i}]", unknown) for i, h in enumerate(histories)]
        if exclude is None and exclude_seen:
            masks = hists
        else:
            masks = []
            for i, h in enumerate(hists):
                extra = self.rows(exclude[i] if exclude is not None else None, "exclude" if one else f"exclude[{i}]",
                                  unknown)
                masks.append(np.concatenate([h, extra]) if exclude_seen else extra)  # repeats are harmless
        out: list[dict[str, list]] = [{} for _ in hists]
        warm = [i for i, h in enumerate(hists) if len(h)]
        if warm:
            for i, res in zip(warm, self._search([hists[i] for i in warm], [masks[i] for i in warm], k)):
                out[i] = res
        for i, h in enumerate(hists):
            if not len(h):
                out[i] = self._popular(masks[i], k)
        return out

    def user_vectors(self, rows: list[np.ndarray]) -> np.ndarray:
        """Histories as vocabulary rows -> (B, d) float32 user vectors (the student's last state, computed by
        `serve_user_vectors`: only what the newest state needs).

        Batches over `BUCKETS_ABOVE` histories are grouped by length (`LENGTH_BUCKETS`) and each group is
        padded only to its own longest: a row's state does not depend on the others' padding, and a batch
        of mostly short histories with a few long ones would otherwise pay the longest's cost for every row."""
        lengths = np.minimum([len(r) for r in rows], self.model.max_len)
        grouped = len(rows) > BUCKETS_ABOVE and self.model.user_tower.pooling != "mean"  # mean pooling: no
        bucket = np.searchsorted(LENGTH_BUCKETS, lengths) if grouped else np.zeros(len(rows), int)  # per-position work
        out = np.empty((len(rows), self.table.shape[1]), dtype=np.float32)
        with torch.inference_mode(), without_onednn():
            for b in np.unique(bucket):
                idx = np.flatnonzero(bucket == b)
                hist = self.model.pad_histories([rows[i] for i in idx])
                if self.user_tower is None:
                    out[idx] = self.model.serve_user_vectors(hist, self.table).numpy()  # trims the padding itself
                else:
                    out[idx] = self.user_tower(hist[:, first_real_column(hist != self.model.num_items):])
        return out

    def _search(self, rows: list[np.ndarray], masks: list[np.ndarray], k: int) -> list[dict[str, list]]:
        """Exact top k with masked rows at -inf (flat index), else index search over-fetched by the largest
        mask, masked rows removed, k kept."""
        xq = np.ascontiguousarray(self.user_vectors(rows), dtype=np.float32)
        if self.exact is not None:
            return self._exact(xq, masks, k)
        fetch = min(self.index.ntotal, k + max(len(m) for m in masks))
        D, I = self.index.search(xq, fetch)
        keep = ~masked(I, masks, self.num_items)
        out = []
        for d, i, ok in zip(D, I, keep):
            sel = np.flatnonzero(ok)[:k]
            out.append(self._result(i[sel], d[sel]))
        return out

    def _exact(self, xq: np.ndarray, masks: list[np.ndarray], k: int) -> list[dict[str, list]]:
        """(B, d) queries -> the k best unmasked rows of the flat index's vectors each (fewer if the mask
        leaves fewer), in chunks of queries of at most `EXACT_BLOCK` scores."""
        (xb, row_of), pos_of = self.exact, self.exact_pos
        out = []
        step = max(1, EXACT_BLOCK // len(xb))
        for lo in range(0, len(xq), step):
            chunk = masks[lo : lo + step]
            scores = torch.from_numpy(xq[lo : lo + step]) @ xb.T  # (b, N)
            lengths = torch.tensor([len(m) for m in chunk])
            cols = torch.from_numpy(pos_of[np.concatenate(chunk).astype(np.int64)]) if lengths.sum() else None
            if cols is not None:
                scores[torch.repeat_interleave(torch.arange(len(chunk)), lengths), cols] = -torch.inf
            D, P = torch.topk(scores, k, dim=1)  # (b, k), best first
            rows, values = row_of[P.numpy()].tolist(), D.double().tolist()  # one conversion for the chunk
            for r, d in zip(rows, values):
                n = k if d[-1] > -np.inf else sum(v > -np.inf for v in d)  # fewer left than k: drop the -inf
                out.append({"items": [self.item_ids[i] for i in r[:n]], "scores": d[:n]})
        return out

    def _popular(self, mask: np.ndarray, k: int) -> dict[str, list]:
        """The k most popular train items outside `mask` (scores = train interaction counts)."""
        order = self.by_popularity[~np.isin(self.by_popularity, mask)][:k]
        return self._result(order, self.popularity[order])

    def _result(self, rows: np.ndarray, scores: np.ndarray) -> dict[str, list]:
        return {"items": [self.item_ids[r] for r in rows.tolist()], "scores": np.asarray(scores, np.float64).tolist()}

    def similar_items(self, item_id: str, k: int = 10) -> dict[str, list]:
        """The k items whose vectors have the highest dot product with `item_id`'s (itself excluded)."""
        k = self.check_k(k)
        if not isinstance(item_id, str):
            raise BadRequest("item_id", f"expected a string item id, got {type(item_id).__name__} {item_id!r}")
        row = self.row.get(item_id)
        if row is None:
            raise UnknownItems("item_id", [item_id], self.num_items, droppable=False)
        xq = self.table[row : row + 1].numpy()
        D, I = self.index.search(np.ascontiguousarray(xq, dtype=np.float32), min(self.index.ntotal, k + 1))
        keep = (I[0] >= 0) & (I[0] != row)
        return self._result(I[0][keep][:k], D[0][keep][:k])


def exact_vectors(index: faiss.Index | MipsIndex) -> tuple[torch.Tensor, np.ndarray] | None:
    """For an inner-product flat index (bare or in an `IndexIDMap`): its vectors (N, d) float32 and the id
    (vocabulary row) of each; None for any other index (searched through FAISS)."""
    ids = None
    if isinstance(index, MipsIndex):  # an approximate index (a flat one never takes the L2 reduction)
        return None
    if isinstance(index, faiss.IndexIDMap):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        index = faiss.downcast_index(index.index)
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    xb = torch.from_numpy(index.reconstruct_n(0, index.ntotal))
    return xb, (np.arange(index.ntotal, dtype=np.int64) if ids is None else ids)


def masked(I: np.ndarray, masks: list[np.ndarray], n: int) -> np.ndarray:
    """(B, F) fetched rows (-1 = none), one array of masked rows per query -> (B, F) bool: masked or none.

    One sorted search for the whole batch over (query, row) keys, memory O(B * F + total mask), whatever
    the catalog size (a per-query `np.isin` costs more than the search itself at batch 1)."""
    B = len(masks)
    lengths = np.fromiter((len(m) for m in masks), dtype=np.int64, count=B)
    keys = np.repeat(np.arange(B, dtype=np.int64) * (n + 1), lengths) + np.concatenate(masks).astype(np.int64)
    keys.sort()
    query = np.where(I < 0, n, I).astype(np.int64) + np.arange(B, dtype=np.int64)[:, None] * (n + 1)  # (B, F)
    if not len(keys):
        return I < 0
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return (keys[pos] == query) | (I < 0)
