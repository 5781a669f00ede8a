"""Peer run: a public library's SASRec with cross-entropy over the whole catalog (RecTools 0.19.0), trained on
llmkd's own split and scored by llmkd's own evaluator (full ranking, seen items masked, docs/protocol.md).

    PeerSettings                       the published SASRec-CE's settings plus the selection schedule
    interactions_table(data, split)    the table the peer trains on ('valid': train items only) or reads
                                       histories from ('test': train + valid), positions as timestamps
    PeerScorer(model, data)            a ScoreFn: (users (B,), split) -> (B, num_items) in llmkd's item order
    markdown(result)                   the table of a finished run

Training and the seeds' JSON are in `llmkd.experiments.peer_training` (RecTools is imported only there, where a
model is built or trained; `make peer-beauty` installs it): the table, the scorer and the report work without
it, on any object shaped like a fitted RecTools transformer model.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from llmkd.data import RecData
from llmkd.infra.artifacts import LlmkdError

LIBRARY = "rectools"
SYSTEM = "SASRec, softmax cross-entropy over the whole catalog (RecTools SASRecModel, loss='softmax')"
PUBLISHED = {"SASRec-CE (CE-SCE-LLMRec)": 0.0597, "BSARec": 0.0611}
REPORTED = ("ndcg@10", "recall@10", "recall@50")
SPLITS = ("valid", "test")
USER, ITEM, WEIGHT, DATETIME = "user_id", "item_id", "weight", "datetime"  # = rectools.Columns
PAD_ROW = 0
"""RecTools' transformer models give the padding token internal item id 0 (external id 'PAD')."""
FLOOR = float(torch.finfo(torch.float32).min)
"""Score of an item the peer has no embedding for (never in its training table): finite, below every other."""
DIFFERENCES = [
    ("loss: softmax over the catalog plus RecTools' PAD token (its fixed, untrained embedding row is one more "
     "class in the denominator); the published CE excludes the padding row; mean over non-padding positions in both"),
    ("block: RecTools' SASRec layer adds the attention output to the layer-normed query (Q + MHA(Q, x, x), as the "
     "original SASRec code); CE-SCE-LLMRec adds it to the un-normed input (x + MHA(Q, x, x)); the feed-forward "
     "residual and the final LayerNorm are alike; block LayerNorms use eps 1e-5 here, 1e-8 there"),
    ("padding: left padding, item 0, embeddings zeroed at padding positions before every block; causal mask only, "
     "no key-padding mask (use_key_padding_mask=False), as the published code"),
    ("positions: learnable 'inverse' positional embeddings over a fixed 50-slot window, the same slots as absolute "
     "positions with left padding; item embeddings scaled by sqrt(64) (use_scale_factor=True, as published)"),
    ("training: every position of the last 51 items of each user's train sequence (shifted sequence), users with "
     "at least 2 train items, as published; items seen only further back than that get no embedding in RecTools "
     "(they score below every other item here, `items_without_embedding` per seed)"),
    ("optimiser: Adam betas (0.9, 0.999), weight decay 1e-8, as published (a LightningModule subclass; RecTools' "
     "own default is betas (0.9, 0.98), no decay)"),
    ("init: Xavier-normal for every weight matrix (RecTools); the published code re-initialises Linear and Embedding "
     "weights only (its feed-forward Conv1d and attention in-projection keep PyTorch's defaults)"),
    ("speed: the softmax loss computes logits only at positions with a target; RecTools computes them at all 50 "
     "positions and ignores the padding ones (`ignore_index=0`): the same loss and gradients, ~8x fewer catalog "
     "products on Beauty"),
    ("selection: valid NDCG@10 by llmkd's evaluator every `eval_every` epochs, best state kept, stop after "
     "`patience` evaluations without a better one; the published run evaluated every 5 epochs for 200 epochs"),
]


@dataclass(frozen=True)
class PeerSettings:
    """SASRec-CE as published (CE-SCE-LLMRec beauty-ce-5) plus the selection schedule."""

    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.6
    lr: float = 5e-4
    weight_decay: float = 1e-8
    adam_betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 512
    max_len: int = 50
    scale_embeddings: bool = True
    epochs: int = 200
    eval_every: int = 5
    patience: int = 10
    """Evaluations on valid without a better NDCG@10 before training stops."""
    eval_batch_size: int = 1024

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# ---------------------------------------------------------------- data -> the peer's table


def interactions_table(data: RecData, split: str) -> pd.DataFrame:
    """The peer's interactions (n, 4): user_id, item_id (llmkd indices), weight 1, datetime = position in the
    user's sequence (s). 'valid': the train items only; 'test': train + valid, i.e. `data.history(u, 'test')`."""
    if split not in SPLITS:
        raise LlmkdError(f"split must be 'valid' or 'test', got {split!r}")
    lens = data.train.lengths()
    users = np.repeat(np.arange(data.num_users, dtype=np.int64), lens)
    items = np.asarray(data.train.values, dtype=np.int64)
    pos = np.arange(len(items), dtype=np.int64) - np.repeat(data.train.offsets[:-1], lens)
    if split == "test":
        has = np.flatnonzero(data.valid_item >= 0)
        users, items = np.concatenate([users, has]), np.concatenate([items, data.valid_item[has]])
        pos = np.concatenate([pos, lens[has]])
        order = np.lexsort((pos, users))
        users, items, pos = users[order], items[order], pos[order]
    return pd.DataFrame({USER: users, ITEM: items, WEIGHT: np.ones(len(items), dtype=np.float32),
                         DATETIME: pos.astype("datetime64[s]")})


# ---------------------------------------------------------------- fitted model -> llmkd scores


def item_rows(external_ids: Sequence, num_items: int) -> np.ndarray:
    """The peer's item id map (its internal id -> external id = llmkd index, 'PAD' first) -> (num_items,) int64:
    the peer's row of each llmkd item, -1 where the peer has none."""
    ext = list(external_ids)
    if not ext or ext[0] != "PAD":
        raise LlmkdError(f"peer item map: expected the padding token 'PAD' at internal id 0, got {ext[:1]}")
    rows = np.full(num_items, -1, dtype=np.int64)
    ids = np.asarray(ext[1:], dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= num_items or len(np.unique(ids)) != len(ids)):
        raise LlmkdError(f"peer item map: external ids must be distinct llmkd item indices in [0, {num_items})")
    rows[ids] = np.arange(1, len(ext), dtype=np.int64)
    return rows


def left_pad(histories: Sequence[np.ndarray], rows: np.ndarray, max_len: int) -> torch.Tensor:
    """Histories (llmkd indices) -> (B, max_len) int64 peer rows: items without a row dropped, the last
    `max_len` kept, right-aligned after PAD_ROW (RecTools' recommend collate)."""
    x = torch.full((len(histories), max_len), PAD_ROW, dtype=torch.long)
    for i, h in enumerate(histories):
        r = rows[np.asarray(h, dtype=np.int64)]
        r = r[r >= 0][-max_len:]
        if len(r):
            x[i, max_len - len(r):] = torch.as_tensor(r)
    return x


def catalog_scores(logits: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """(B, n_rows) peer logits -> (B, num_items) float32 in llmkd's item order, FLOOR where rows is -1."""
    idx = torch.as_tensor(np.maximum(rows, 0), dtype=torch.long, device=logits.device)
    out = logits.float()[:, idx].cpu()
    out[:, torch.as_tensor(rows < 0)] = FLOOR
    return out


class PeerScorer:
    """A `ScoreFn` over a fitted RecTools transformer model (RecTools' own u2i path: the last position of
    `encode_sessions`, the similarity module's towers and logits), whole rows in llmkd's item order."""

    def __init__(self, model, data: RecData) -> None:
        prep = model.data_preparator
        self.net, self.data, self.max_len = model.torch_model, data, int(prep.session_max_len)
        self.rows = item_rows(prep.item_id_map.external_ids, data.num_items)

    def __call__(self, users: np.ndarray, split: str) -> torch.Tensor:
        """(B,) user indices -> (B, num_items) float32 on the CPU."""
        x = left_pad([self.data.history(int(u), split) for u in users], self.rows, self.max_len)
        net, training = self.net, self.net.training
        net.eval()
        try:
            with torch.no_grad():
                items = net.item_model.get_all_embeddings()  # (n_rows, d)
                h = net.encode_sessions({"x": x.to(items.device)}, items)[:, -1, :]  # (B, d)
                sim = net.similarity_module
                logits = sim(sim.session_tower_forward(h), sim.item_tower_forward(items))  # (B, n_rows)
        finally:
            net.train(training)
        return catalog_scores(logits, self.rows)


def markdown(result: dict) -> str:
    """The mean ± std table of a `run_peers` result, with the published numbers beside it."""
    mean, std = result["rows"]["mean"], result["rows"]["std"]
    cols = [("valid", "ndcg@10")] + [("test", m) for m in REPORTED]
    lines = [f"{result['system']}, {result['library']} {result['version']}, seeds {result['seeds']}:", "",
             "| split metric | mean ± std |", "|---|---|"]
    lines += [f"| {s} {m} | {mean[s][m]:.4f} ± {std[s][m]:.4f} |" for s, m in cols]
    lines += ["", "Published test NDCG@10: " + ", ".join(f"{k} {v}" for k, v in result["published"].items())]
    return "\n".join(lines)
