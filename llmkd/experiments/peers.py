"""Peer run: a public library's SASRec with cross-entropy over the whole catalog (RecTools 0.19.0), trained on
llmkd's own split and scored by llmkd's own evaluator (full ranking, seen items masked, docs/protocol.md).

    interactions_table(data, split)    the table the peer trains on ('valid': train items only) or reads
                                       histories from ('test': train + valid), positions as timestamps
    PeerScorer(model, data)            a ScoreFn: (users (B,), split) -> (B, num_items) in llmkd's item order
    fit_peer(data, settings, seed)     train, evaluating valid NDCG@10 every few epochs; keep the best
    run_peer(out_dir, settings, seed)  one seed: fit, then valid and test metrics of the best epoch
    run_peers(out_dir, seeds, output)  every seed, the JSON rewritten after each (finished seeds reused)

RecTools is imported only where a model is built or trained (`make peer-beauty` installs it): the table, the
scorer and the report work without it, on any object shaped like a fitted RecTools transformer model.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llmkd.data import RecData, load_data
from llmkd.evaluation.metrics import PROTOCOL, evaluate_scores, summarize
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
     "positions and ignores the padding ones (`ignore_index=0`): the same loss and gradients, ~7x fewer catalog "
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


# ---------------------------------------------------------------- training (needs RecTools)


def _as_array(values):
    """A list or tuple of ids -> an ndarray as pandas 2's `pd.unique` made it (object dtype when any is a str)."""
    if not isinstance(values, (list, tuple)):
        return values
    return np.asarray(values, dtype=object if any(isinstance(v, str) for v in values) else None)


def pandas3_compat() -> bool:
    """Let RecTools 0.19.0 (written for pandas < 3) build its id maps under pandas 3, whose `pd.unique` refuses
    the tuple `IdMap.from_values(('PAD',))` it passes; ids are unchanged. True when the patch was applied."""
    from rectools.dataset.identifiers import IdMap

    if int(pd.__version__.split(".")[0]) < 3 or getattr(IdMap, "_llmkd_compat", False):
        return False
    from_values, add_ids = IdMap.from_values.__func__, IdMap.add_ids
    IdMap.from_values = classmethod(lambda cls, values: from_values(cls, _as_array(values)))
    IdMap.add_ids = lambda self, values, raise_if_already_present=False: add_ids(
        self, _as_array(values), raise_if_already_present)
    IdMap._llmkd_compat = True
    return True


def _published_adam_module():
    """RecTools' TransformerLightningModule with the published optimiser (RecTools hard-codes betas (0.9, 0.98)),
    and its softmax loss computed at the target positions only (same loss, see `softmax_loss_at_targets`)."""
    from rectools.models.nn.transformers.lightning import TransformerLightningModule

    class PublishedAdamModule(TransformerLightningModule):
        weight_decay = 0.0
        betas = (0.9, 0.999)

        def configure_optimizers(self) -> torch.optim.Adam:
            if self.optimizer is None:
                self.optimizer = torch.optim.Adam(self.torch_model.parameters(), lr=self.lr, betas=self.betas,
                                                  weight_decay=self.weight_decay)
            return self.optimizer

        def softmax_loss_at_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            """RecTools' softmax loss (`_calc_softmax_loss`: cross-entropy over the catalog, weighted, summed, divided
            by the number of positive terms), with logits computed only where a target is (y != 0). RecTools
            scores all `max_len` positions and drops the padding ones by `ignore_index`: on Beauty (a mean of
            ~7 train items in a 50-slot window) that is ~7x the catalog products for the same loss."""
            y, w = batch["y"], batch["yw"]
            keep = y != 0
            model = self.torch_model
            item_embs = model.item_model.get_all_embeddings()
            sessions = model.encode_sessions(batch, item_embs)[keep]  # (N, d)
            logits = model.similarity_module(sessions, item_embs) / self.logits_t  # (N, n_items + extra tokens)
            loss = torch.nn.functional.cross_entropy(logits, y[keep], reduction="none") * w[keep]
            return loss.sum() / (loss > 0).to(loss.dtype).sum()

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            if self.loss != "softmax":
                return super().training_step(batch, batch_idx)
            loss = self.softmax_loss_at_targets(batch)
            self.log(self.train_loss_name, loss, on_step=False, on_epoch=True, prog_bar=self.verbose > 0)
            return loss

    return PublishedAdamModule


def build_model(settings: PeerSettings):
    """A RecTools SASRecModel with the settings (ids only, full softmax, no RecTools validation). Not
    `deterministic`: on CUDA, torch has no deterministic kernel for the 3-d cross-entropy RecTools computes;
    `fit_peer` seeds torch, numpy and the loader."""
    from rectools.models import SASRecModel
    from rectools.models.nn.item_net import IdEmbeddingsItemNet

    pandas3_compat()
    module = _published_adam_module()
    module.weight_decay, module.betas = settings.weight_decay, tuple(settings.adam_betas)
    return SASRecModel(
        n_blocks=settings.blocks, n_heads=settings.heads, n_factors=settings.dim, dropout_rate=settings.dropout,
        session_max_len=settings.max_len, loss="softmax", lr=settings.lr, batch_size=settings.batch_size,
        epochs=settings.eval_every, deterministic=False, verbose=0, item_net_block_types=(IdEmbeddingsItemNet,),
        pos_encoding_kwargs={"use_scale_factor": settings.scale_embeddings}, lightning_module_type=module,
        use_key_padding_mask=False, use_causal_attn=True,
    )


def valid_ndcg(data: RecData, model, settings: PeerSettings) -> float:
    """Valid NDCG@10 of the model by llmkd's evaluator (every valid user)."""
    per_user = evaluate_scores(data, "valid", PeerScorer(model, data), (10,), settings.eval_batch_size,
                               name="peer SASRec")
    return summarize(per_user)["ndcg@10"]


def fit_peer(data: RecData, settings: PeerSettings, seed: int, log: Callable[[str], object] = print) -> tuple:
    """Train on the 'valid' table in chunks of `eval_every` epochs, keep the state with the best valid NDCG@10.

    Returns (model at its best epoch, {"best_epoch", "epochs", "best_valid_ndcg@10", "curve"})."""
    import pytorch_lightning as pl
    from rectools.dataset import Dataset

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    pl.seed_everything(seed, workers=True, verbose=False)
    model = build_model(settings)  # first: it applies the pandas-3 shim the dataset's id maps need
    dataset = Dataset.construct(interactions_table(data, "valid"))
    best, best_state, best_epoch, stale, epoch, curve = -1.0, None, 0, 0, 0, []
    with warnings.catch_warnings():
        for noise in (".*does not have many workers.*", ".*val_dataloader.*", ".*LeafSpec.*",
                      "Pydantic serializer warnings.*"):  # RecTools' config of the item net as a tuple of types
            warnings.filterwarnings("ignore", message=noise)
        while epoch < settings.epochs and stale < settings.patience:
            n = min(settings.eval_every, settings.epochs - epoch)
            start = time.perf_counter()
            model.fit_partial(dataset, min_epochs=n, max_epochs=n)
            epoch += n
            ndcg = valid_ndcg(data, model, settings)
            curve.append({"epoch": epoch, "valid_ndcg@10": ndcg, "seconds": time.perf_counter() - start})
            if ndcg > best:
                best, best_epoch, stale = ndcg, epoch, 0
                best_state = copy.deepcopy(model.torch_model.state_dict())
            else:
                stale += 1
            log(f"seed {seed} epoch {epoch}: valid NDCG@10 {ndcg:.4f} (best {best:.4f} at {best_epoch})")
    model.torch_model.load_state_dict(best_state)
    return model, {"best_epoch": best_epoch, "epochs": epoch, "best_valid_ndcg@10": best, "curve": curve}


def run_peer(out_dir: str | Path, settings: PeerSettings, seed: int, data: RecData | None = None,
             log: Callable[[str], object] = print) -> dict:
    """One seed on `<out_dir>/data`: fit, choose the epoch on valid, report valid and test once (the test
    history is train + valid). Returns the row: metrics per split, epochs, wall seconds, and per-user
    NDCG@10 (B,) float32 per split under 'per_user' (users in `data.eval_users(split)` order)."""
    data = data if data is not None else load_data(Path(out_dir) / "data")
    start = time.perf_counter()
    model, info = fit_peer(data, settings, seed, log)
    scorer = PeerScorer(model, data)
    per_user = {s: evaluate_scores(data, s, scorer, (10, 20, 50), settings.eval_batch_size, name="peer SASRec")
                for s in SPLITS}
    row = {s: summarize(per_user[s]) for s in SPLITS}
    row.update(info, wall_seconds=time.perf_counter() - start, items_without_embedding=int((scorer.rows < 0).sum()))
    row["per_user"] = {s: per_user[s]["ndcg@10"].astype(np.float32) for s in SPLITS}
    return row


# ---------------------------------------------------------------- seeds -> JSON


def aggregate(per_seed: dict[str, dict]) -> dict:
    """{'per_seed', 'mean', 'std'} of REPORTED per split over the finished seeds (std ddof 1; 0 for one seed)."""
    rows = {"per_seed": per_seed, "mean": {}, "std": {}}
    for s in SPLITS:
        vals = {m: [r[s][m] for r in per_seed.values()] for m in REPORTED}
        rows["mean"][s] = {m: float(np.mean(v)) for m, v in vals.items()}
        rows["std"][s] = {m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in vals.items()}
    return rows


def per_user_path(output: Path) -> Path:
    """Where the per-user NDCG@10 of every seed go beside the JSON (for paired comparisons on the same users)."""
    return output.with_name(output.stem + ".per_user.npz")


def _write_atomic(path: Path, obj: dict | None = None, arrays: dict[str, np.ndarray] | None = None) -> None:
    """JSON (obj) or an .npz (arrays) through a temporary file and a rename: a kill leaves the old or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if arrays is None:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    else:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    os.replace(tmp, path)


def _previous(output: Path, settings: dict, fingerprint: str) -> dict:
    """Finished seeds (str -> row) of an earlier run of the same settings on the same data; {} when none."""
    if not output.is_file():
        return {}
    try:
        old = json.loads(output.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmkdError(f"{output}: unreadable JSON ({e}); move it away to start over") from None
    if old.get("settings") != settings or old.get("data_fingerprint") != fingerprint:
        raise LlmkdError(f"{output}: made with other settings or data; choose another --output or move it away")
    return dict(old.get("rows", {}).get("per_seed", {}))


def run_peers(out_dir: str | Path, seeds: Sequence[int], output: str | Path, settings: PeerSettings | None = None,
              run_one: Callable[..., dict] = run_peer, log: Callable[[str], object] = print) -> dict:
    """Every seed on `<out_dir>/data`; the JSON at `output` (and the per-user .npz beside it) rewritten after
    each seed; seeds finished there by the same settings on the same data are reused, not rerun, and kept
    (mean and std are over every finished seed in the file)."""
    settings, output = settings or PeerSettings(), Path(output)
    data = load_data(Path(out_dir) / "data")
    finished = _previous(output, settings.as_json(), data.fingerprint)
    npz = per_user_path(output)
    arrays = dict(np.load(npz)) if npz.is_file() else {}
    arrays.update({f"users_{s}": data.eval_users(s) for s in SPLITS})
    output.parent.mkdir(parents=True, exist_ok=True)
    result = {}
    for seed in seeds:
        if str(seed) in finished:
            log(f"seed {seed}: reused from {output}")
        else:
            row = run_one(out_dir, settings, seed, data=data, log=log)
            arrays.update({f"seed{seed}_{s}_ndcg@10": v for s, v in row.pop("per_user", {}).items()})
            finished[str(seed)] = row
            _write_atomic(npz, arrays=arrays)
        done = dict(sorted(finished.items(), key=lambda kv: int(kv[0])))  # earlier seeds not asked for now stay
        result = {"system": SYSTEM, "library": LIBRARY, "version": _version(), "settings": settings.as_json(),
                  "seeds": [int(k) for k in done], "rows": aggregate(done), "published": PUBLISHED,
                  "differences": DIFFERENCES, "protocol": PROTOCOL, "data_fingerprint": data.fingerprint,
                  "data": {"users": data.num_users, "items": data.num_items}, "per_user": str(npz),
                  "environment": environment()}
        _write_atomic(output, result)
    return result


def _version(name: str = LIBRARY) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def environment() -> dict:
    """The libraries the numbers depend on, the cores, and the pandas-3 shim (`pandas3_compat`)."""
    names = ("torch", "numpy", "pandas", "pytorch-lightning", "pm-implicit")
    return {**{n: _version(n) for n in names}, "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
            "pandas3_compat": "IdMap.from_values/add_ids get tuples and lists as arrays (ids unchanged)"
            if int(pd.__version__.split(".")[0]) >= 3 else None}


def markdown(result: dict) -> str:
    """The mean ± std table of a `run_peers` result, with the published numbers beside it."""
    mean, std = result["rows"]["mean"], result["rows"]["std"]
    cols = [("valid", "ndcg@10")] + [("test", m) for m in REPORTED]
    lines = [f"{result['system']}, {result['library']} {result['version']}, seeds {result['seeds']}:", "",
             "| split metric | mean ± std |", "|---|---|"]
    lines += [f"| {s} {m} | {mean[s][m]:.4f} ± {std[s][m]:.4f} |" for s, m in cols]
    lines += ["", "Published test NDCG@10: " + ", ".join(f"{k} {v}" for k, v in result["published"].items())]
    return "\n".join(lines)
