"""The two-tower student: an item tower and a user tower scored by a dot product.

Item tower: an id embedding, plus (optionally) a linear projection of frozen item-text features
(the teacher's item embeddings). User tower: reads the item-tower vectors of the history and
produces one state per position, causally (the state at position t has seen items <= t), so a
whole sequence trains on every next item at once. Histories are left-padded with `num_items`.

Saved as `config.json` + `model.safetensors`; `TwoTower.from_pretrained(folder)` rebuilds it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llmkd.infra.artifacts import LlmkdError, reading
from llmkd.infra.config import DEFAULT_INIT_STD, StudentConfig
from llmkd.student.sasrec import LAYER_NORM_EPS, SASRecEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def first_real_column(real: torch.Tensor) -> int:
    """(B, L) bool real-item mask of left-padded histories -> the first column holding a real item in some
    row (L - 1 when none does): the columns before it are padding in every row and can be dropped."""
    return int(real.any(0).to(torch.int8).argmax()) if real.any() else real.shape[1] - 1


class ItemTower(nn.Module):
    """Item vectors from an id embedding (+ projected frozen content features)."""

    def __init__(self, num_items: int, dim: int, content_dim: int = 0, content_hidden: int = 0,
                 id_dropout: float = 0.0) -> None:
        super().__init__()
        self.num_items, self.id_dropout = num_items, id_dropout
        self.embedding = nn.Embedding(num_items + 1, dim, padding_idx=num_items)
        nn.init.normal_(self.embedding.weight, std=DEFAULT_INIT_STD)
        with torch.no_grad():
            self.embedding.weight[num_items].zero_()
        if not content_dim:
            self.content_proj = None
        elif content_hidden:
            self.content_proj = nn.Sequential(nn.Linear(content_dim, content_hidden), nn.GELU(),
                                              nn.Linear(content_hidden, dim))
        else:
            self.content_proj = nn.Linear(content_dim, dim)
        self.register_buffer("content", torch.zeros(num_items + 1, content_dim) if content_dim else None)

    def forward(self) -> torch.Tensor:
        """All item vectors, (num_items + 1, d); the last row is the padding item (zero)."""
        vectors = self.embedding.weight
        if self.content_proj is not None:
            if self.training and self.id_dropout > 0:  # whole id rows dropped, unscaled (DropoutNet)
                keep = torch.rand(self.num_items + 1, 1, device=vectors.device) >= self.id_dropout
                vectors = vectors * keep
            pad = torch.ones(self.num_items + 1, 1, device=vectors.device)
            pad[-1] = 0
            vectors = vectors + self.content_proj(self.content) * pad
        return vectors

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) item ids -> (...) x d: the rows of `forward()` for those ids alone, so a step that reads a
        few thousand items of a large catalog computes (and, with a sparse embedding, differentiates) only
        those. Row dropout (`id_dropout`) is drawn over the whole table, so it is not supported here."""
        if self.training and self.id_dropout > 0 and self.content_proj is not None:
            raise RuntimeError("ItemTower.rows: id_dropout draws over the whole table; train with forward()")
        vectors = self.embedding(ids)
        if self.content_proj is not None:
            vectors = vectors + self.content_proj(self.content[ids]) * (ids != self.num_items).unsqueeze(-1)
        return vectors


class ItemRows:
    """Item vectors looked up by id (`items[ids]`), standing in for the (N, d) table where a training step
    reads only some rows (sparse item updates, `distill.item_updates`)."""

    def __init__(self, tower: ItemTower) -> None:
        self.tower = tower

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tower.rows(ids)


def init_from_content(embedding: nn.Embedding, vectors: np.ndarray, std: float, whiten: bool = False) -> None:
    """Overwrite the id rows (all but the padding row) with the top principal components of `vectors`
    (num_items, D), scaled to standard deviation `std`; columns beyond D keep their random values. With
    `whiten` each component is first scaled to unit variance, so the few leading directions of a text
    encoder's anisotropic space do not dominate the rows (as WhitenRec, Zhang et al., ICDE 2024).

    PCA by an eigendecomposition of the D x D covariance: deterministic, and memory O(D^2) whatever the
    catalog size (an SVD of the item matrix would hold a num_items x D factor)."""
    x = torch.as_tensor(vectors, dtype=torch.float64)
    x = x - x.mean(0)
    _, eigvecs = torch.linalg.eigh(x.T @ x / max(len(x) - 1, 1))  # ascending eigenvalues
    k = min(embedding.embedding_dim, x.shape[1])
    pcs = x @ eigvecs[:, -k:].flip(1)  # (num_items, k), largest variance first
    if whiten:
        pcs = pcs / pcs.std(0).clamp(min=1e-12)
    pcs = pcs * (std / pcs.std().clamp(min=1e-12))
    with torch.no_grad():
        embedding.weight[: len(x), :k] = pcs.to(embedding.weight.dtype)


def content_init_vectors(vectors: np.ndarray, source: str, seed: int) -> np.ndarray:
    """The vectors (num_items, D) `content_init` starts from (`StudentConfig.content_init_source`): the
    teacher's as they are, their rows shuffled across items, or Gaussian rows with their column means and
    standard deviations; the controls are drawn from `seed`."""
    rng = np.random.default_rng(seed)
    if source == "teacher":
        return vectors
    x = np.asarray(vectors, dtype=np.float64)
    if source == "shuffled":
        return x[rng.permutation(len(x))].astype(np.float32)
    if source == "random":
        return (rng.standard_normal(x.shape) * x.std(0) + x.mean(0)).astype(np.float32)
    raise LlmkdError(f"student.content_init_source: unknown {source!r}")


def init_item_embedding(embedding: nn.Embedding, cfg: StudentConfig, teacher_vectors: np.ndarray | None,
                        seed: int) -> None:
    """The trainer's item-id initialisation: from (controls of) the teacher's item vectors with
    `cfg.content_init` > 0, else Gaussian at `cfg.init_std` (the default 0.02 keeps the constructor's draw)."""
    if cfg.content_init:
        init_from_content(embedding, content_init_vectors(teacher_vectors, cfg.content_init_source, seed),
                          cfg.content_init, whiten=cfg.content_init_whiten)
    elif cfg.init_std != DEFAULT_INIT_STD:
        with torch.no_grad():
            nn.init.normal_(embedding.weight[:-1], std=cfg.init_std)  # the padding row stays zero


class UserTower(nn.Module):
    """Causal user states from history vectors: a small pre-norm transformer, SASRec's blocks (`llmkd.student.sasrec`)
    or a recency-weighted mean; then a layer norm and (not SASRec) a residual MLP."""

    def __init__(self, dim: int, max_len: int, pooling: str = "transformer", num_layers: int = 2,
                 num_heads: int = 2, dropout: float = 0.3, recency_decay: float = 0.0, num_users: int = 0,
                 attend_padding: bool = False) -> None:
        super().__init__()
        self.pooling, self.num_heads, self.recency_decay = pooling, num_heads, recency_decay
        self.dropout = nn.Dropout(dropout)
        if pooling == "transformer":
            self.position = nn.Embedding(max_len, dim)
            nn.init.normal_(self.position.weight, std=0.02)
            self.input_norm = nn.LayerNorm(dim)
            layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        elif pooling == "sasrec":
            self.encoder = SASRecEncoder(dim, max_len, num_layers, num_heads, dropout, attend_padding)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS if pooling == "sasrec" else 1e-5)
        self.mlp = None if pooling == "sasrec" else nn.Sequential(  # SASRec: the last layer norm is the state
            nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.user_embedding = nn.Embedding(num_users, dim) if num_users else None
        if self.user_embedding is not None:
            nn.init.normal_(self.user_embedding.weight, std=0.02)

    def forward(self, seq: torch.Tensor, real: torch.Tensor, users: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """(B, L, d) history vectors, (B, L) bool real-item mask -> (B, L, d) user states, or (B, 1, d)
        with `last_only` (serving: the mean pooling then computes only the newest state)."""
        B, L, d = seq.shape
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()  # (L, L) query t sees keys <= t
        if self.pooling == "transformer":
            x = self.dropout(self.input_norm(seq + self.position.weight[-L:]))  # left-padded: last = newest
            allowed = (causal & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=seq.device)  # pads see themselves
            mask = (~allowed).repeat_interleave(self.num_heads, dim=0)  # (B*H, L, L), True = blocked
            x = self.encoder(x, mask=mask)
            x = x[:, -1:] if last_only else x
        elif self.pooling == "sasrec":
            x = self.encoder(seq, real)
            x = x[:, -1:] if last_only else x
        else:
            steps = torch.arange(L, device=seq.device, dtype=seq.dtype)
            queries = steps[-1:] if last_only else steps
            w = torch.exp(-self.recency_decay * (queries[:, None] - steps[None, :]).clamp(min=0))  # (Q, L)
            w = w * (causal[-len(queries) :] & real[:, None, :])  # (B, Q, L)
            x = torch.einsum("bts,bsd->btd", w, seq) / w.sum(-1, keepdim=True).clamp(min=1e-9)
        return self.head(x, users)  # (B, L, d)

    def head(self, x: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Q, d) pooled states -> user states: norm, residual MLP, + the user's embedding if any."""
        x = self.norm(x)
        x = x if self.mlp is None else x + self.mlp(x)
        if self.user_embedding is not None and users is not None:
            x = x + self.user_embedding(users)[:, None, :]
        return x

    @torch.inference_mode()
    def pooled_last_state(self, history: torch.Tensor, real: torch.Tensor, table: torch.Tensor,
                          users: torch.Tensor | None = None) -> torch.Tensor:
        """Mean pooling's newest state from item rows (B, L) and the item table, without the (B, L, d)
        history tensor: `F.embedding_bag` sums table rows weighted by the recency weights of `forward`.
        Equal to `last_state(table[history], real)` up to float rounding (tests/test_student.py)."""
        L = history.shape[1]
        steps = torch.arange(L, device=history.device, dtype=table.dtype)
        w = torch.exp(-self.recency_decay * (steps[-1] - steps)) * real  # (B, L): the last query's weights
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-9)
        x = F.embedding_bag(history, table, per_sample_weights=w, mode="sum")  # (B, d)
        return self.head(x[:, None], users)[:, -1]

    @torch.inference_mode()
    def last_state(self, seq: torch.Tensor, real: torch.Tensor, users: torch.Tensor | None = None,
                   traced: bool = False) -> torch.Tensor:
        """(B, L, d) history vectors, (B, L) bool real-item mask -> (B, d): the newest state as `forward` computes
        it in eval mode, for less (serving). Only the newest position's state is read, so the last encoder
        layer runs attention and feed-forward for that one query (its keys and values still come from every
        position); the other layers run as in `forward`, with the mask broadcast over heads instead of
        repeated. Equal to `forward(...)[:, -1]` up to float rounding (tests/test_student.py). `traced`: no
        branch on the data (the padding mask is always built), for graph export (`llmkd.serving.onnx`)."""
        if self.training:
            raise RuntimeError("last_state is the eval-mode computation; call model.eval() first")
        if self.pooling != "transformer":
            return self.forward(seq, real, users, last_only=True)[:, -1]
        L = seq.shape[1]
        if not traced and bool(real.all()):  # no padding (one history, or all as long): the mask is the causal one
            allowed = None
        else:
            causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
            allowed = ((causal & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=seq.device))[:, None]
        x = self.input_norm(seq + self.position.weight[-L:])  # (B, L, d)
        layers = self.encoder.layers
        for layer in layers[:-1]:
            h = layer.norm1(x)
            x = x + attention(layer, h, h, allowed)
            x = x + feed_forward(layer, x)
        last = layers[-1]
        h = last.norm1(x)  # (B, L, d): keys and values of every position
        newest = None if allowed is None else allowed[:, :, -1:]  # (B, 1, 1, L); unmasked: it sees every position
        x = x[:, -1:] + attention(last, h[:, -1:], h, newest, causal=False)  # (B, 1, d)
        x = x + feed_forward(last, x)
        if self.encoder.norm is not None:
            x = self.encoder.norm(x)
        return self.head(x, users)[:, -1]  # (B, d)


def attention(layer: nn.TransformerEncoderLayer, hq: torch.Tensor, hkv: torch.Tensor, allowed: torch.Tensor | None,
              causal: bool = True) -> torch.Tensor:
    """`layer.self_attn` (eval) for queries (B, Q, d) over keys / values (B, L, d) -> (B, Q, d), through
    `scaled_dot_product_attention` with the module's own projection weights. `allowed` (B, 1, Q, L) bool;
    None: causal (query t sees keys <= t) when `causal`, else every key."""
    attn = layer.self_attn
    B, Q, d = hq.shape
    H = attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    if hq is hkv:  # every position queries: one projection for q, k and v
        q, k, v = F.linear(hq, w, b).view(B, Q, 3 * H, d // H).transpose(1, 2).chunk(3, dim=1)  # (B, H, L, d/H)
    else:
        q = F.linear(hq, w[:d], b[:d]).view(B, Q, H, d // H).transpose(1, 2)  # (B, H, Q, d/H)
        k, v = F.linear(hkv, w[d:], b[d:]).view(B, -1, 2 * H, d // H).transpose(1, 2).chunk(2, dim=1)  # (B, H, L, d/H)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None and causal)  # (B, H, Q, d/H)
    return attn.out_proj(o.transpose(1, 2).reshape(B, Q, d))


def feed_forward(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's pre-norm feed-forward block (eval: no dropout), (B, Q, d) -> (B, Q, d)."""
    return layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))


class TwoTower(nn.Module):
    """Two-tower recommender: score(user, item) = user_state . item_vector."""

    def __init__(self, num_items: int, max_len: int = 50, dim: int = 64, pooling: str = "transformer",
                 num_layers: int = 2, num_heads: int = 2, dropout: float = 0.3, recency_decay: float = 0.0,
                 num_users: int = 0, content_dim: int = 0, content_hidden: int = 0, id_dropout: float = 0.0,
                 attend_padding: bool = False) -> None:
        super().__init__()
        self.config = dict(num_items=num_items, max_len=max_len, dim=dim, pooling=pooling, num_layers=num_layers,
                           num_heads=num_heads, dropout=dropout, recency_decay=recency_decay,
                           num_users=num_users, content_dim=content_dim, content_hidden=content_hidden,
                           id_dropout=id_dropout, attend_padding=attend_padding)
        self.num_items, self.max_len = num_items, max_len
        self.item_tower = ItemTower(num_items, dim, content_dim, content_hidden, id_dropout)
        self.user_tower = UserTower(dim, max_len, pooling, num_layers, num_heads, dropout, recency_decay, num_users,
                                    attend_padding)

    @classmethod
    def from_config(cls, cfg: StudentConfig, num_items: int, max_len: int, num_users: int,
                    content_dim: int = 0) -> TwoTower:
        """The one factory from a `StudentConfig` to constructor arguments."""
        kw = asdict(cfg)
        use_user_id, content = kw.pop("use_user_id"), kw.pop("content_features")
        for name in ("content_init", "content_init_source", "content_init_whiten", "content_init_anchor", "init_std"):  # initialisations the trainer applies
            kw.pop(name)  # (`init_item_embedding`)
        return cls(num_items=num_items, max_len=max_len, num_users=num_users if use_user_id else 0,
                   content_dim=content_dim if content else 0, **kw)

    def item_vectors(self) -> torch.Tensor:
        """(num_items, d) float32: what the FAISS index stores."""
        return self.item_tower()[: self.num_items]

    def forward(self, history: torch.Tensor, users: torch.Tensor | None = None, rows: bool = False,
                length_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor | ItemRows]:
        """(B, L) left-padded item ids -> user states (B, L, d), item vectors (num_items, d). With `rows`
        the item vectors come as an `ItemRows` lookup and nothing is computed over the whole catalog.
        `length_groups` > 1: the user tower runs on that many groups of rows of similar history length
        (`grouped_states`); the same states at real positions."""
        items = ItemRows(self.item_tower) if rows else self.item_tower()  # lookup, or the (N + 1, d) table
        vectors, real = items[history], history != self.num_items
        if length_groups > 1:
            states = self.grouped_states(vectors, real, users, length_groups)
        else:
            states = self.user_tower(vectors, real, users)
        return states, items if rows else items[: self.num_items]

    def grouped_states(self, vectors: torch.Tensor, real: torch.Tensor, users: torch.Tensor | None,
                       groups: int) -> torch.Tensor:
        """The user tower's (B, L, d) states computed in `groups` equal-sized groups of rows sorted by history
        length, each without the columns that are padding in all its rows (as `user_vectors` trims): padding
        is never attended to (SASRec's padding key counts max_len - n wherever the batch is cut) and positions
        count from the right, so the states at real positions equal one full-width run's (padded positions,
        which no loss reads, hold zeros or a pad's state). A shuffled batch of a sparse catalog is mostly padding (one
        long history sets its width), so this skips most of the tower's work without changing the batches."""
        B, L, d = vectors.shape
        states = vectors.new_zeros(B, L, d)
        for idx in real.sum(1).argsort(stable=True).tensor_split(groups):
            if len(idx):
                first = first_real_column(real[idx])
                states[idx, first:] = self.user_tower(vectors[idx, first:], real[idx, first:],
                                                      None if users is None else users[idx])
        return states

    def user_vectors(self, history: torch.Tensor, users: torch.Tensor | None = None,
                     table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) left-padded histories -> (B, d) user vectors (the last state).

        `table` is the item tower's output (`item_tower()`), e.g. computed once for serving. Columns
        that are padding in every row are dropped first: positions count from the right, and padding is
        never attended to, so the last state is unchanged and short histories cost less."""
        table = self.item_tower() if table is None else table
        real = history != self.num_items
        first = first_real_column(real)
        history, real = history[:, first:], real[:, first:]
        return self.user_tower(table[history], real, users, last_only=True)[:, -1]

    def serve_user_vectors(self, history: torch.Tensor, table: torch.Tensor, users: torch.Tensor | None = None,
                           traced: bool = False) -> torch.Tensor:
        """`user_vectors` for serving (eval mode, no autograd): the same padding trim, then the user tower's
        `last_state`, which computes only what the newest state needs (mean pooling: `pooled_last_state`, one
        fused weighted gather). (B, L) int64 -> (B, d) float32.
        `traced`: no trim and no other branch on the data, for graph export (the caller pads)."""
        real = history != self.num_items
        if not traced:
            first = first_real_column(real)
            history, real = history[:, first:], real[:, first:]
            if self.user_tower.pooling == "mean":  # the weighted mean in one fused gather-and-sum
                return self.user_tower.pooled_last_state(history, real, table, users)
        return self.user_tower.last_state(table[history], real, users, traced=traced)

    def pad_histories(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Histories -> (B, max_len) int64, the most recent `max_len` items, left-padded."""
        recent = [np.asarray(h, dtype=np.int64)[-self.max_len :] for h in histories]
        lengths = np.array([len(h) for h in recent], dtype=np.int64)
        out = np.full((len(recent), self.max_len), self.num_items, dtype=np.int64)
        filled = np.arange(self.max_len) >= self.max_len - lengths[:, None]  # (B, max_len), True where an item goes
        out[filled] = np.concatenate(recent) if len(recent) else []  # row-major order = each history in turn
        return torch.from_numpy(out)

    def save_pretrained(self, folder: str | Path, is_main_process: bool = True,
                        save_function: Callable[..., Any] | None = None, extra: dict | None = None) -> None:
        """Write `config.json` + `model.safetensors` (+ `extra` into the config file)."""
        if not is_main_process:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps({**self.config, **(extra or {})}, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> TwoTower:
        """Load a folder written by `save_pretrained`."""
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise LlmkdError(f"{folder}: not a student folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        import inspect

        names = inspect.signature(cls.__init__).parameters
        with reading(folder / CONFIG_NAME, "student config"):
            raw = json.loads((folder / CONFIG_NAME).read_text())
            model = cls(**{k: v for k, v in raw.items() if k in names})
        with reading(folder / WEIGHTS_NAME, "student weights"):
            model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return model.eval()

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
