"""Distil the teacher's scores into the two-tower student with HuggingFace Accelerate.

Loss per batch of history windows: next-item cross-entropy at every position (full softmax over the
catalog, or popularity-sampled softmax with logQ correction) + alpha * listwise KL on the teacher's
top-K candidates plus the positive, at each user's 'kd' state (history = train[:-1], positive = the
last train item; see `llmkd.teacher.STATES`). Valid NDCG@10 is measured after every epoch on all
processes' shards (gathered, each user once); the best epoch is exported as the student artifact.

The same code runs on one CPU, several CPU processes (gloo), one or several GPUs:
`accelerate launch scripts/distill.py --config configs/ml100k.yaml`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from llmkd.artifacts import LlmkdError, StageTimer, atomic_dir, new_meta, reading, write_json
from llmkd.config import Config
from llmkd.data import RecData, load_data
from llmkd.evaluate import mask_seen, metrics_from_ranks, target_ranks
from llmkd.student import TwoTower
from llmkd.teacher import TeacherCache


class WindowDataset(Dataset):
    """Train sequences cut into left-padded windows of `max_len` (input items, next-item labels).

    Item: {'input_ids': (L,) int64, 'labels': (L,) int64 (-100 = none), 'user': int64, 'kd': bool};
    `kd` marks each user's newest window, whose last position is the teacher's 'kd' state.
    """

    def __init__(self, train: list[np.ndarray], num_items: int, max_len: int) -> None:
        self.rows: list[tuple[int, int, int, bool]] = []
        self.train, self.num_items, self.max_len = train, num_items, max_len
        for u, seq in enumerate(train):
            for end in range(len(seq) - 1, 0, -max_len):
                self.rows.append((u, max(0, end - max_len), end, end == len(seq) - 1))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        u, start, end, kd = self.rows[i]
        seq = self.train[u]
        n = end - start
        x = torch.full((self.max_len,), self.num_items, dtype=torch.long)
        y = torch.full((self.max_len,), -100, dtype=torch.long)
        x[-n:] = torch.as_tensor(seq[start:end])
        y[-n:] = torch.as_tensor(seq[start + 1 : end + 1])
        return {"input_ids": x, "labels": y, "user": torch.tensor(u), "kd": torch.tensor(kd)}


def get_dataloaders(data: RecData, cfg: Config) -> tuple[DataLoader, DataLoader]:
    """Train windows (shuffled) and valid users (in order)."""
    train_ds = WindowDataset(data.train, data.num_items, cfg.data.max_history)
    if len(train_ds) == 0:
        raise LlmkdError("data: no user has 2 or more train interactions; nothing to train on")
    users = torch.as_tensor(data.eval_users("valid"))
    # its own generator: the order depends on (seed, epoch) only, and starting an epoch (or resuming one)
    # draws nothing from the global RNG that dropout uses
    order = torch.Generator().manual_seed(cfg.distill.seed)
    train_dl = DataLoader(train_ds, batch_size=cfg.distill.batch_size, shuffle=True, drop_last=cfg.distill.drop_last,
                          generator=order)
    eval_dl = DataLoader(users, batch_size=cfg.distill.eval_batch_size, shuffle=False)
    return train_dl, eval_dl


def hard_loss(states: torch.Tensor, items: torch.Tensor, labels: torch.Tensor, cfg, log_q: torch.Tensor | None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Next-item cross-entropy over labelled positions: states (B, L, d), items (N, d), labels (B, L)."""
    keep = labels != -100
    h, y = states[keep], labels[keep]  # (P, d), (P,)
    if cfg.loss == "full_softmax":
        return F.cross_entropy(h @ items.T, y)
    neg = torch.multinomial(log_q.exp(), cfg.num_negatives, replacement=True, generator=generator)  # (S,)
    pos_logit = (h * items[y]).sum(-1, keepdim=True) - log_q[y, None]  # (P, 1)
    neg_logit = h @ items[neg].T - log_q[neg][None]  # (P, S)
    neg_logit = neg_logit.masked_fill(neg[None] == y[:, None], float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], 1)
    return F.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long, device=h.device))


class KDTargets:
    """Teacher candidates at the 'kd' state: top-K ids + scores, plus the positive's exact score."""

    def __init__(self, teacher: TeacherCache, k: int, scale: float, device: torch.device) -> None:
        missing = {"topk_ids_kd", "topk_scores_kd", "user_kd"} - set(teacher.arrays)
        if missing:
            raise LlmkdError(f"{teacher.folder}: teacher cache lacks {sorted(missing)}; rebuild it (build_teacher.py --force)")
        self.ids = teacher.arrays["topk_ids_kd"][:, :k].to(device)  # (U, K)
        self.scores = teacher.arrays["topk_scores_kd"][:, :k].to(device) * scale
        self.user = teacher.arrays["user_kd"].to(device)  # (U, d_t)
        self.items = teacher.item_emb.to(device)  # (N, d_t)
        self.scale = scale

    def __call__(self, users: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(b,) users and positives -> candidates (b, K+1), teacher scores (b, K+1), mask (b, K+1)."""
        pos_score = (self.user[users] * self.items[positives]).sum(-1, keepdim=True) * self.scale
        ids = self.ids[users]  # (b, K), -1 = padding where a user has fewer than K unseen items
        cand = torch.cat([ids.clamp(min=0), positives[:, None]], 1)
        scores = torch.cat([self.scores[users].masked_fill(ids < 0, 0.0), pos_score], 1)
        mask = torch.cat([ids >= 0, ~(ids == positives[:, None]).any(1, keepdim=True)], 1)  # positive once
        return cand, scores, mask


@torch.no_grad()
def validate(model: TwoTower, eval_dl, data: RecData, accelerator: Accelerator, split: str = "valid") -> dict[str, float]:
    """NDCG / Recall @10 and @50 on `split`, users sharded over processes and gathered once each."""
    model.eval()
    net = accelerator.unwrap_model(model)
    ranks = []
    targets = torch.as_tensor(data.targets(split), device=accelerator.device)
    for users in eval_dl:
        u = users.cpu().numpy()
        hists = [data.history(x, split) for x in u]
        hist = net.pad_histories(hists).to(accelerator.device)
        states, items = model(hist, users)
        scores = mask_seen((states[:, -1] @ items.T).float().cpu(), hists).to(accelerator.device)
        ranks.append(accelerator.gather_for_metrics(target_ranks(scores, targets[users])))
    m = metrics_from_ranks(torch.cat(ranks).cpu().numpy(), (10, 50))
    model.train()
    return {k: float(v.mean()) for k, v in m.items() if k.startswith(("ndcg", "recall"))}


def make_accelerator(cfg: Config, project_dir: Path) -> Accelerator:
    """An Accelerator that forms one distributed run on CPU-only machines too (DESIGN.md)."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.distill.grad_accum,
        log_with=cfg.distill.log_with,
        project_dir=str(project_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, state: dict) -> None:
    """Atomically replace `ckpt_dir/last`: weights, optimizer, RNG states and `train_state.json`
    (epoch, batches done in it, running loss, best so far), so a killed run resumes exactly."""
    tmp, last, old = ckpt_dir / "last.tmp", ckpt_dir / "last", ckpt_dir / "last.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "train_state.json", state)
        if last.exists():
            last.rename(old)
        tmp.rename(last)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, ckpt_dir: Path) -> dict | None:
    """Restore the newest complete checkpoint (`last`, or `last.old` if a crash hit the swap)."""
    for folder in (ckpt_dir / "last", ckpt_dir / "last.old"):
        if (folder / "train_state.json").is_file():
            with reading(folder, "training checkpoint"):
                accelerator.load_state(str(folder))
                return json.loads((folder / "train_state.json").read_text())
    return None


def train(cfg: Config, resume: bool = False, get_loaders=get_dataloaders) -> dict:
    """Train one student (KD when alpha > 0) and export the best valid epoch to `out_dir/<name>`."""
    out = Path(cfg.out_dir)
    dc = cfg.distill
    ckpt_dir = out / "checkpoints" / dc.name
    accelerator = make_accelerator(cfg, ckpt_dir)
    set_seed(dc.seed)
    data = load_data(out / "data")
    need_teacher = dc.alpha > 0 or cfg.student.content_features
    teacher = TeacherCache(out / dc.teacher, data) if need_teacher else None
    content_dim = teacher.item_emb.shape[1] if teacher is not None and cfg.student.content_features else 0
    model = TwoTower.from_config(cfg.student, data.num_items, cfg.data.max_history, data.num_users, content_dim)
    if content_dim:
        model.item_tower.content[: data.num_items] = teacher.item_emb
    train_dl, eval_dl = get_loaders(data, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=dc.lr, weight_decay=dc.weight_decay)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    device = accelerator.device
    kd_targets = KDTargets(teacher, dc.kd_top_k, dc.teacher_scale, device) if dc.alpha > 0 else None
    kd_loss = dc.make_kd_loss()
    counts = torch.as_tensor(data.item_counts(), dtype=torch.float32, device=device) + 1
    log_q = (counts / counts.sum()).log()

    state = {"epoch": 0, "step": 0, "loss_sum": 0.0, "best_ndcg": -1.0, "best_epoch": -1, "bad_epochs": 0,
             "history": []}
    resumed = load_checkpoint(accelerator, ckpt_dir) if resume else None
    if resumed is not None:
        state = resumed
        accelerator.print(f"resumed from {ckpt_dir}: epoch {state['epoch'] + 1}, {state['step']} batches done")
    elif accelerator.is_main_process and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    accelerator.wait_for_everyone()
    if dc.log_with:
        accelerator.init_trackers(dc.name, config={"alpha": dc.alpha, "temperature": dc.temperature,
                                                   "lr": dc.lr, "seed": dc.seed, "dim": cfg.student.dim})
    with StageTimer() as timer:
        for epoch in range(state["epoch"], dc.epochs):
            if state["bad_epochs"] >= dc.patience:
                break
            train_dl.set_epoch(epoch)
            model.train()
            t0 = time.perf_counter()
            # resumed mid-epoch: the same order (seed + epoch), past the batches already done
            loader = accelerator.skip_first_batches(train_dl, state["step"]) if state["step"] else train_dl
            bar = tqdm(loader, desc=f"{dc.name} epoch {epoch + 1}", disable=not accelerator.is_local_main_process,
                       leave=False, initial=state["step"], total=len(train_dl))
            for batch in bar:
                with accelerator.accumulate(model):
                    states, items = model(batch["input_ids"], batch["user"])  # (B, L, d), (N, d)
                    # Each process's mean is re-weighted by its share of the global batch, so the
                    # gradient DDP averages equals the one-process gradient of the same global batch.
                    local = torch.stack([(batch["labels"] != -100).sum(), batch["kd"].sum()]).float()
                    share = local * accelerator.num_processes / accelerator.reduce(local.clone(), "sum").clamp(min=1)
                    loss = hard_loss(states, items, batch["labels"], dc, log_q) * share[0]
                    if kd_targets is not None and batch["kd"].any():
                        kd = batch["kd"]
                        users, pos = batch["user"][kd], batch["labels"][kd, -1]
                        cand, t_scores, mask = kd_targets(users, pos)
                        s_scores = (states[kd, -1, None, :] * items[cand]).sum(-1)  # (b, K+1)
                        loss = loss + dc.alpha * kd_loss(s_scores, t_scores, mask) * share[1]
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                state["step"] += 1
                state["loss_sum"] += loss.item()
                bar.set_postfix(loss=f"{state['loss_sum'] / state['step']:.4f}")
                if dc.checkpoint_every and state["step"] % dc.checkpoint_every == 0 and state["step"] < len(train_dl):
                    save_checkpoint(accelerator, ckpt_dir, state)
            end_epoch(state, validate(model, eval_dl, data, accelerator), epoch, time.perf_counter() - t0)
            if state["best_epoch"] == epoch + 1 and accelerator.is_main_process:
                with atomic_dir(ckpt_dir / "best") as tmp:
                    accelerator.unwrap_model(model).save_pretrained(tmp)
            row = state["history"][-1]
            accelerator.print(f"{dc.name} epoch {epoch + 1}: loss {row['train_loss']:.4f} valid ndcg@10 "
                              f"{row['ndcg@10']:.4f} (best {state['best_ndcg']:.4f} @ {state['best_epoch']})")
            if dc.log_with:
                accelerator.log({k if k in ("train_loss",) else f"valid/{k}": v for k, v in row.items()
                                 if k not in ("epoch", "seconds")}, step=epoch + 1)
            save_checkpoint(accelerator, ckpt_dir, state)
    if dc.log_with:
        accelerator.end_training()
    result = {"best_epoch": state["best_epoch"], "best_valid_ndcg@10": state["best_ndcg"],
              "epochs_run": state["epoch"], "history": state["history"]}
    if accelerator.is_main_process:
        net = TwoTower.from_pretrained(ckpt_dir / "best")
        meta = new_meta("student", cfg.to_dict(), data.fingerprint, **result,
                        num_parameters=net.num_parameters(), num_processes=accelerator.num_processes,
                        distributed_type=str(accelerator.distributed_type), timing=timer.as_dict())
        with atomic_dir(out / dc.name) as tmp:
            net.save_pretrained(tmp)
            write_json(tmp / "meta.json", meta)
            write_json(tmp / "resolved_config.json", cfg.to_dict())
    accelerator.wait_for_everyone()
    return result


def end_epoch(state: dict, metrics: dict[str, float], epoch: int, seconds: float) -> None:
    """Record an epoch's valid metrics in `state`, update the best epoch and patience, reset the step."""
    state["history"].append({"epoch": epoch + 1, "train_loss": state["loss_sum"] / max(state["step"], 1),
                             **metrics, "seconds": round(seconds, 2)})
    state.update(epoch=epoch + 1, step=0, loss_sum=0.0)
    if metrics["ndcg@10"] > state["best_ndcg"]:
        state.update(best_ndcg=metrics["ndcg@10"], best_epoch=epoch + 1, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
