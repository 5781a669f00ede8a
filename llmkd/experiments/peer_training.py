"""Training the peer (RecTools' SASRec, `llmkd.experiments.peers`) and its seeds' JSON.

    fit_peer(data, settings, seed)     train, evaluating valid NDCG@10 every few epochs; keep the best;
                                       with a checkpoint, resume from the last few epochs after a kill
    run_peer(out_dir, settings, seed)  one seed: fit, then valid and test metrics of the best epoch
    run_peers(out_dir, seeds, output)  every seed, the JSON rewritten after each (finished seeds reused)

RecTools is imported inside the functions that build or train a model.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata as md
import json
import logging
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llmkd.data import RecData, load_data
from llmkd.evaluation.metrics import PROTOCOL, evaluate_scores, summarize
from llmkd.experiments.peers import (
    DIFFERENCES,
    LIBRARY,
    PUBLISHED,
    REPORTED,
    SPLITS,
    SYSTEM,
    PeerScorer,
    PeerSettings,
    interactions_table,
)
from llmkd.infra.artifacts import LlmkdError

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
        targets_only = True  # False: RecTools' own loss path (logits at every position), for speed comparisons

        def configure_optimizers(self) -> torch.optim.Adam:
            if self.optimizer is None:
                self.optimizer = torch.optim.Adam(self.torch_model.parameters(), lr=self.lr, betas=self.betas,
                                                  weight_decay=self.weight_decay)
            return self.optimizer

        def softmax_loss_at_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            """RecTools' softmax loss (`_calc_softmax_loss`: cross-entropy over the catalog, weighted, summed, divided
            by the number of positive terms), with logits computed only where a target is (y != 0). RecTools
            scores all `max_len` positions and drops the padding ones by `ignore_index`: on Beauty (50 slots, a mean of
            ~5.9 targets per user) that is ~8x the catalog products for the same loss."""
            y, w = batch["y"], batch["yw"]
            keep = y != 0
            model = self.torch_model
            item_embs = model.item_model.get_all_embeddings()
            sessions = model.encode_sessions(batch, item_embs)[keep]  # (N, d)
            logits = model.similarity_module(sessions, item_embs) / self.logits_t  # (N, n_items + extra tokens)
            loss = torch.nn.functional.cross_entropy(logits, y[keep], reduction="none") * w[keep]
            return loss.sum() / (loss > 0).to(loss.dtype).sum()

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            if self.loss != "softmax" or not self.targets_only:
                return super().training_step(batch, batch_idx)
            loss = self.softmax_loss_at_targets(batch)
            self.log(self.train_loss_name, loss, on_step=False, on_epoch=True, prog_bar=self.verbose > 0)
            return loss

    return PublishedAdamModule


def build_model(settings: PeerSettings, targets_only: bool = True):
    """A RecTools SASRecModel with the settings (ids only, full softmax, no RecTools validation). Not
    `deterministic`: on CUDA, torch has no deterministic kernel for the 3-d cross-entropy RecTools computes;
    `fit_peer` seeds torch, numpy and the loader. `targets_only=False`: RecTools' own loss path, for timing it."""
    from rectools.models import SASRecModel
    from rectools.models.nn.item_net import IdEmbeddingsItemNet

    pandas3_compat()
    module = _published_adam_module()
    module.weight_decay, module.betas = settings.weight_decay, tuple(settings.adam_betas)
    module.targets_only = targets_only
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


def checkpoint_path(out_dir: str | Path, seed: int) -> Path:
    """Where a seed's training state goes after every `eval_every` epochs (removed once its row is written)."""
    return Path(out_dir) / "peer_sasrec" / f"seed{seed}.pt"


def _checkpoint_key(data: RecData, settings: PeerSettings, seed: int) -> dict:
    """What a checkpoint must match to be resumed: the data, the seed and the settings but the epoch cap."""
    return {"data": data.fingerprint, "seed": seed, "settings": {**settings.as_json(), "epochs": None}}


def _save_checkpoint(path: Path, model, state: dict) -> None:
    """The model, Adam's state, the random generators and `state` (best so far, curve), via a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lm = model.lightning_model
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_rng = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]  # tensors: weights_only loads
    blob = {**state, "model": lm.torch_model.state_dict(), "optimizer": lm.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng, "python": random.getstate()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _restore_checkpoint(path: Path, model, dataset, key: dict) -> dict | None:
    """Rebuild `model` on `dataset` as `fit_partial`'s first call does, then load the checkpoint at `path`
    into it (weights, Adam, random generators); returns its state, or None when there is no checkpoint."""
    if not path.is_file():
        return None
    blob = torch.load(path, weights_only=True)
    if blob.get("key") != key:
        raise LlmkdError(f"{path}: a checkpoint of other settings, seed or data; move it away to start over")
    model._build_model_from_dataset(dataset)  # RecTools' own first-call path of fit_partial
    model.is_fitted = model.lightning_model.is_fitted = True  # no Xavier re-init on the next fit
    lm = model.lightning_model
    lm.torch_model.load_state_dict(blob.pop("model"))
    lm.configure_optimizers()
    lm.optimizer.load_state_dict(blob.pop("optimizer"))
    rng = blob.pop("rng")
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(rng["python"])
    return blob


@contextlib.contextmanager
def quiet_lightning():
    """Lightning's info lines ('Trainer.fit stopped', ...) and the routine warnings of RecTools' fits silenced."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        for noise in (".*does not have many workers.*", ".*val_dataloader.*", ".*LeafSpec.*",
                      "Pydantic serializer warnings.*"):  # RecTools' config of the item net as a tuple of types
            warnings.filterwarnings("ignore", message=noise)
        yield


def fit_chunk(model, dataset, epochs: int) -> None:
    """`epochs` more epochs of RecTools' `fit_partial`, each call on a fresh Lightning Trainer: the first fit of
    a Trainer draws other random numbers than a reused one's, and a resumed fit starts on a fresh one."""
    if model.is_fitted:
        model.fit_trainer = copy.deepcopy(model._trainer)
    model.fit_partial(dataset, min_epochs=epochs, max_epochs=epochs)


def fit_peer(data: RecData, settings: PeerSettings, seed: int, log: Callable[[str], object] = print,
             checkpoint: Path | None = None) -> tuple:
    """Train on the 'valid' table in chunks of `eval_every` epochs, keep the state with the best valid NDCG@10.
    With `checkpoint`, the state after every chunk is saved there and a later call resumes from it (same
    random draws as an uninterrupted run).

    Returns (model at its best epoch, {"best_epoch", "epochs", "best_valid_ndcg@10", "curve", "resumed_at"})."""
    import pytorch_lightning as pl
    from rectools.dataset import Dataset

    pl.seed_everything(seed, workers=True, verbose=False)
    model = build_model(settings)  # first: it applies the pandas-3 shim the dataset's id maps need
    dataset = Dataset.construct(interactions_table(data, "valid"))
    key = _checkpoint_key(data, settings, seed)
    state = (_restore_checkpoint(checkpoint, model, dataset, key) if checkpoint is not None else None) or {
        "key": key, "best": -1.0, "best_state": None, "best_epoch": 0, "stale": 0, "epoch": 0, "curve": []}
    resumed_at = state["epoch"]
    if resumed_at:
        log(f"seed {seed}: resumed from {checkpoint} at epoch {resumed_at} (best {state['best']:.4f})")
    with quiet_lightning():
        while state["epoch"] < settings.epochs and state["stale"] < settings.patience:
            n = min(settings.eval_every, settings.epochs - state["epoch"])
            start = time.perf_counter()
            fit_chunk(model, dataset, n)
            state["epoch"] += n
            ndcg = valid_ndcg(data, model, settings)
            state["curve"].append({"epoch": state["epoch"], "valid_ndcg@10": ndcg,
                                   "seconds": time.perf_counter() - start})
            if ndcg > state["best"]:
                state.update(best=ndcg, best_epoch=state["epoch"], stale=0,
                             best_state=copy.deepcopy(model.torch_model.state_dict()))
            else:
                state["stale"] += 1
            if checkpoint is not None:
                _save_checkpoint(checkpoint, model, state)
            log(f"seed {seed} epoch {state['epoch']}: valid NDCG@10 {ndcg:.4f} "
                f"(best {state['best']:.4f} at {state['best_epoch']})")
    model.torch_model.load_state_dict(state["best_state"])
    return model, {"best_epoch": state["best_epoch"], "epochs": state["epoch"], "best_valid_ndcg@10": state["best"],
                   "curve": state["curve"], "resumed_at": resumed_at}


def run_peer(out_dir: str | Path, settings: PeerSettings, seed: int, data: RecData | None = None,
             log: Callable[[str], object] = print) -> dict:
    """One seed on `<out_dir>/data`: fit, choose the epoch on valid, report valid and test once (the test
    history is train + valid). Returns the row: metrics per split, epochs, wall seconds, and per-user
    NDCG@10 (B,) float32 per split under 'per_user' (users in `data.eval_users(split)` order)."""
    data = data if data is not None else load_data(Path(out_dir) / "data")
    start = time.perf_counter()
    model, info = fit_peer(data, settings, seed, log, checkpoint_path(out_dir, seed))
    scorer = PeerScorer(model, data)
    per_user = {s: evaluate_scores(data, s, scorer, (10, 20, 50), settings.eval_batch_size, name="peer SASRec")
                for s in SPLITS}
    row = {s: summarize(per_user[s]) for s in SPLITS}
    row.update(info, wall_seconds=time.perf_counter() - start, items_without_embedding=int((scorer.rows < 0).sum()),
               train_seconds=sum(c["seconds"] for c in info["curve"]))  # wall_seconds: this call (after a resume)
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
    (mean and std are over every finished seed in the file). A seed killed mid-way resumes from its last
    `eval_every` chunk (`checkpoint_path`)."""
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
        checkpoint_path(out_dir, seed).unlink(missing_ok=True)  # the row is written: its training state is done
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
