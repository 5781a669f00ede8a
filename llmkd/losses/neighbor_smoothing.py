"""Label smoothing toward the target's neighbours in the teacher's item space (`distill.neighbor_smoothing`).

The next-item cross-entropy puts all the target mass on the one item bought next. With smoothing eps the
target becomes (1 - eps) on that item and eps spread evenly over its k nearest items by the teacher's item
vectors (cosine), so items that read alike (same line, brand, use) share some of each other's evidence.
Over the whole catalog, with lse the log-sum-exp of the logits z:

    (1 - eps) (lse - z_y) + eps (lse - mean_j z_nj) = [lse - z_y] + eps (z_y - mean_j z_nj),

the ordinary cross-entropy plus a term over k + 1 logits per position, so the fused full softmax stays as
it is. Neighbours are found once per run (a FAISS search over the normalised vectors, `llmkd.index`).
"""

from __future__ import annotations

import numpy as np
import torch

from llmkd.index import build_index, search
from llmkd.infra.config import IndexConfig


def item_neighbors(vectors: np.ndarray, k: int, index_type: str = "flat", nprobe: int = 32,
                   chunk: int = 8192) -> torch.Tensor:
    """(N, D) item vectors -> (N, k) int64: each item's k nearest other items by cosine, nearest first
    (itself excluded; an item with fewer than k others found repeats its nearest)."""
    x = np.asarray(vectors, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(k, len(x) - 1)
    index = build_index(x, IndexConfig(type=index_type, ivf_nprobe=nprobe))
    out = np.empty((len(x), k), dtype=np.int64)
    for s in range(0, len(x), chunk):
        _, ids = search(index, x[s : s + chunk], k + 1)
        rows = np.arange(s, s + len(ids))[:, None]
        keep = (ids != rows) & (ids >= 0)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # found others first, in rank order
        picked = np.take_along_axis(ids, order, 1)
        ok = np.take_along_axis(keep, order, 1)
        out[s : s + len(ids)] = np.where(ok, picked, picked[:, :1])
    return torch.as_tensor(out)


def neighbor_smoothing_term(h: torch.Tensor, items: torch.Tensor, y: torch.Tensor,
                            neighbors: torch.Tensor) -> torch.Tensor:
    """mean over positions of z_y - mean_j z_nj: states h (P, d), item vectors (N, d) or an ItemRows lookup,
    targets y (P,), neighbours (N, k) int64; eps times this, added to the cross-entropy, is the smoothed loss."""
    nbrs = neighbors[y]  # (P, k)
    z_y = (h * items[y]).sum(-1)  # (P,)
    z_n = torch.einsum("pd,pkd->pk", h, items[nbrs]).mean(1)  # (P,)
    return (z_y - z_n).mean()
