"""Distil the teacher's scores into the two-tower student with HuggingFace Accelerate.

Loss per batch of history windows: next-item cross-entropy at every position (full softmax over the
catalog, or popularity-sampled softmax with logQ correction) + alpha * a KD loss (`distill.kd_loss`,
listwise KL by default) on the teacher's top-K candidates plus the positive (candidates: items the user
has not consumed before that position, in or before the window), at every position
the teacher encoded (each user's 'kd' state, history = train[:-1], and with `teacher.position_stride`
every stride-th cut before it) + optional alignment terms (`distill.user_align`, `distill.item_align`). Valid NDCG@10 is measured after every epoch on all
processes' shards (gathered, each user once); the best epoch is exported as the student artifact.

The same code runs on one CPU, several CPU processes (gloo), one or several GPUs:
`accelerate launch scripts/distill.py --config configs/ml100k.yaml`.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from llmkd.data import RecData, load_data
from llmkd.distill.kd_targets import KDTargets
from llmkd.distill.windows import get_dataloaders, trim_padding
from llmkd.evaluation.metrics import blocked_ranks, metrics_from_ranks
from llmkd.infra.artifacts import LlmkdError, StageTimer, atomic_dir, new_meta, write_json
from llmkd.infra.checkpoints import load_checkpoint, run_record, same_run, save_checkpoint, teacher_fingerprint
from llmkd.infra.config import Config
from llmkd.infra.lineage import input_record
from llmkd.infra.locks import main_process_lock
from llmkd.losses.full_softmax import full_softmax_loss
from llmkd.losses.neighbor_smoothing import item_neighbors, neighbor_smoothing_term
from llmkd.student import TwoTower, content_init_vectors, init_item_embedding
from llmkd.teacher import TeacherCache

TEACHER_KEYS = ("item_emb", "user_pos", "pos_user", "pos_cut")
"""The teacher cache arrays training reads; the per-split user vectors are left on disk."""


def hard_loss(states: torch.Tensor, items: torch.Tensor, labels: torch.Tensor, cfg, log_q: torch.Tensor | None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Next-item cross-entropy over labelled positions: states (B, L, d), items (N, d), labels (B, L)."""
    keep = labels != -100
    h, y = states[keep], labels[keep]  # (P, d), (P,)
    if cfg.loss == "full_softmax":
        return full_softmax_loss(h, items, y)
    if cfg.loss != "sampled_softmax":
        raise LlmkdError(f"distill.loss {cfg.loss!r}: resolve it for the catalog first (DistillConfig.hard_loss_for)")
    neg = torch.multinomial(log_q.exp(), cfg.num_negatives, replacement=True, generator=generator)  # (S,)
    pos_logit = (h * items[y]).sum(-1, keepdim=True) - log_q[y, None]  # (P, 1)
    neg_logit = h @ items[neg].T - log_q[neg][None]  # (P, S)
    neg_logit = neg_logit.masked_fill(neg[None] == y[:, None], float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], 1)
    return F.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long, device=h.device))


def popularity_log_q(data: RecData) -> torch.Tensor:
    """(N,) log of each item's share of the training interactions (+1 each): the sampled softmax's negative
    distribution and its logQ correction."""
    counts = torch.as_tensor(data.item_counts(), dtype=torch.float32) + 1
    return (counts / counts.sum()).log()


class TeacherHeads(nn.Module):
    """Training-only linear heads reading the student's user states and item vectors into the teacher's
    space, for `distill.user_align` and `distill.item_align`; not part of the exported student."""

    def __init__(self, dim: int, teacher_dim: int, user: bool, item: bool) -> None:
        super().__init__()
        self.user = nn.Linear(dim, teacher_dim) if user else None
        self.item = nn.Linear(dim, teacher_dim) if item else None

    def forward(self, states: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (self.user(states) if self.user is not None else None,
                self.item(items) if self.item is not None else None)


def distill_loss(states: torch.Tensor, items: torch.Tensor, batch: dict, dc, log_q: torch.Tensor,
                 kd_targets: KDTargets | None, kd_loss: nn.Module, heads: nn.Module, accelerator: Accelerator,
                 neighbors: torch.Tensor | None = None) -> torch.Tensor:
    """Hard-label loss + alpha * KD loss (+ user_align * user-vector and item_align * item-vector
    alignment with the teacher) for one batch. Each term is a mean over this process's rows,
    re-weighted by the process's share of the global batch, so the gradient DDP averages equals the
    one-process gradient of the same global batch."""
    labels, rows = batch["labels"], batch["teacher_rows"]
    at = rows >= 0  # (B, L) positions with a teacher vector
    local = torch.stack([(labels != -100).sum(), at.sum()]).float()
    share = local * accelerator.num_processes / accelerator.reduce(local.clone(), "sum").clamp(min=1)
    loss = hard_loss(states, items, labels, dc, log_q) * share[0]
    if neighbors is not None:  # the hard targets smoothed toward their neighbours (`neighbor_smoothing`)
        keep = labels != -100
        loss = loss + dc.neighbor_smoothing * neighbor_smoothing_term(states[keep], items, labels[keep], neighbors) * share[0]
    h, pos, r = states[at], labels[at], rows[at]  # (P, d), (P,), (P,)
    if dc.alpha > 0 and len(r):
        cand, t_scores, mask = kd_targets(r, pos)
        s_scores = torch.einsum("pd,pkd->pk", h, items[cand])  # (P, K+1), without scoring the whole catalog
        loss = loss + dc.alpha * kd_loss(s_scores, t_scores, mask) * share[1]
    if dc.user_align > 0 or dc.item_align > 0:
        user_proj, item_proj = heads(h, items)  # one call through DDP, every output used
        if dc.user_align > 0:  # a batch without teacher positions adds 0 (and zero gradients)
            cos = F.cosine_similarity(user_proj, kd_targets.user_at(r), dim=-1)
            loss = loss + dc.user_align * ((1 - cos).mean() if len(r) else 0.0 * user_proj.sum()) * share[1]
        if dc.item_align > 0:
            cos = F.cosine_similarity(item_proj, kd_targets.items, dim=-1)
            loss = loss + dc.item_align * (1 - cos).mean()
    return loss


def make_optimizers(model: TwoTower, heads: nn.Module, dc, sparse: bool) -> list[torch.optim.Optimizer]:
    """AdamW over every parameter; with `sparse` item updates the item embedding instead becomes sparse and
    learns with SparseAdam (same lr, betas and eps; lazy moments: a row's moments and weights change only
    at the steps that read it), so a step's optimizer cost follows the rows it read, not the catalog."""
    params = [*model.parameters(), *heads.parameters()]
    if not sparse:
        return [torch.optim.AdamW(params, lr=dc.lr, weight_decay=dc.weight_decay)]
    table = model.item_tower.embedding
    table.sparse = True
    return [torch.optim.AdamW([p for p in params if p is not table.weight], lr=dc.lr, weight_decay=dc.weight_decay),
            torch.optim.SparseAdam([table.weight], lr=dc.lr)]


@torch.no_grad()
def validate(model: TwoTower, eval_dl, data: RecData, accelerator: Accelerator, split: str = "valid",
             item_block: int = 65536) -> dict[str, float]:
    """NDCG / Recall @10 and @50 on `split`, users sharded over processes and gathered once each, items
    scored `item_block` at a time (`blocked_ranks`); all -inf when any of the student's scores is
    non-finite (a diverged epoch, see `end_epoch`)."""
    model.eval()
    net = accelerator.unwrap_model(model)
    ranks, bad = [], []
    targets = torch.as_tensor(data.targets(split), device=accelerator.device)
    full = net.item_tower()  # (N + 1, d), once per validation
    table = full[: net.num_items]  # (N, d)
    for users in eval_dl:  # sorted by history length: user_vectors drops each batch's all-padding columns
        u = users.cpu().numpy()
        hists = [data.history(x, split) for x in u]
        hist = net.pad_histories(hists).to(accelerator.device)
        vectors = net.user_vectors(hist, users, full).float()  # (B, d)
        tgt = targets[users]
        rank, flags = blocked_ranks(lambda lo, hi: vectors @ table[lo:hi].T, net.num_items, item_block, tgt, hists,
                                    lambda: (vectors * table[tgt]).sum(-1))
        bad.append(accelerator.gather_for_metrics(flags.long()))
        ranks.append(accelerator.gather_for_metrics(rank))
    m = metrics_from_ranks(torch.cat(ranks).cpu().numpy(), (10, 50))
    model.train()
    diverged = bool(torch.cat(bad).any())
    return {k: float("-inf") if diverged else float(v.mean()) for k, v in m.items() if k.startswith(("ndcg", "recall"))}


def make_accelerator(cfg: Config, project_dir: Path) -> Accelerator:
    """An Accelerator that forms one distributed run on CPU-only machines too (a plain
    `Accelerator()` there would run each process alone; `cpu=True` gives MULTI_CPU with a working gather)."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.distill.grad_accum,
        log_with=cfg.distill.log_with,
        project_dir=str(project_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def train(cfg: Config, resume: bool = False, get_loaders=get_dataloaders,
          on_epoch: Callable[[int, float], bool] | None = None) -> dict:
    """Train one student (KD when alpha > 0) and export the best valid epoch to `out_dir/<name>`, holding
    the student's lock: it covers `checkpoints/<name>/` too, which another run would delete or resume.
    `on_epoch(epoch, valid NDCG@10)` is called after each epoch (a resumed run's earlier epochs first); when it
    returns True the run stops there, pruned (`llmkd.distill.pruning`): its best epoch is exported as usual, with
    `pruned_at_epoch` in meta.json, and a later run that resumes it without `on_epoch` goes on."""
    accelerator = make_accelerator(cfg, Path(cfg.out_dir) / "checkpoints" / cfg.distill.name)
    with main_process_lock(accelerator, Path(cfg.out_dir) / cfg.distill.name):
        return _train(cfg, accelerator, resume, get_loaders, on_epoch)


def _train(cfg: Config, accelerator: Accelerator, resume: bool, get_loaders, on_epoch=None) -> dict:
    """`train`, under the lock."""
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints" / cfg.distill.name
    set_seed(cfg.distill.seed)
    data = load_data(out / "data")
    dc = dataclasses.replace(cfg.distill, loss=cfg.distill.hard_loss_for(data.num_items))  # 'auto' resolved
    teacher = (TeacherCache(out / dc.teacher, data, keys=TEACHER_KEYS) if cfg.uses_teacher
               else None)  # its lineage checked too
    content_dim = teacher.item_emb.shape[1] if teacher is not None and cfg.student.content_features else 0
    model = TwoTower.from_config(cfg.student, data.num_items, cfg.data.max_history, data.num_users, content_dim)
    if content_dim:
        model.item_tower.content[: data.num_items] = teacher.item_emb
    init_item_embedding(model.item_tower.embedding, cfg.student, teacher.item_emb if teacher is not None else None,
                        dc.seed)
    anchor = model.item_tower.embedding.weight.detach().clone() if cfg.student.content_init_anchor else None
    kd_targets = (KDTargets(teacher, data.train, dc.kd_top_k, dc.teacher_scale, accelerator.device,
                            dc.kd_index_for(data.num_items), dc.kd_nprobe) if dc.learns_from_teacher else None)
    train_dl, eval_dl = get_loaders(data, cfg, kd_targets.rows_by_user(data.train) if kd_targets else None)
    heads = TeacherHeads(cfg.student.dim, teacher.item_emb.shape[1] if teacher is not None else 0,
                         dc.user_align > 0, dc.item_align > 0)
    sparse = cfg.item_updates_for(data.num_items, accelerator.num_processes) == "sparse"
    optimizers = make_optimizers(model, heads, dc, sparse)
    if dc.user_align > 0 or dc.item_align > 0:  # DDP refuses a module without parameters
        model, heads, *optimizers, train_dl, eval_dl = accelerator.prepare(model, heads, *optimizers, train_dl, eval_dl)
    else:
        model, *optimizers, train_dl, eval_dl = accelerator.prepare(model, *optimizers, train_dl, eval_dl)
    device = accelerator.device
    anchor = anchor.to(device) if anchor is not None else None
    neighbors = (item_neighbors(content_init_vectors(teacher.item_emb, cfg.student.content_init_source, dc.seed),
                                dc.neighbor_k, dc.kd_index_for(data.num_items), dc.kd_nprobe).to(device)
                 if dc.neighbor_smoothing else None)
    kd_loss = dc.make_kd_loss()
    log_q = popularity_log_q(data).to(device)

    state = {"epoch": 0, "step": 0, "loss_sum": 0.0, "best_ndcg": -1.0, "best_epoch": -1, "bad_epochs": 0,
             "history": [], **run_record(cfg, data.fingerprint)}
    resumed = (load_checkpoint(accelerator, ckpt_dir, lambda old: same_run(old, cfg, data.fingerprint, data.num_items))
               if resume else None)
    if resumed is not None:
        state = resumed
        state.pop("pruned_at", None)  # a pruned run resumed goes on, unless its epochs prune it again below
        accelerator.print(f"resumed from {ckpt_dir}: epoch {state['epoch'] + 1}, {state['step']} batches done")
        if on_epoch is not None:
            state["pruned_at"] = next((r["epoch"] for r in state["history"] if on_epoch(r["epoch"], r["ndcg@10"])), None)
    elif accelerator.is_main_process and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    accelerator.wait_for_everyone()
    if dc.log_with:
        accelerator.init_trackers(dc.name, config={"alpha": dc.alpha, "temperature": dc.temperature,
                                                   "lr": dc.lr, "seed": dc.seed, "dim": cfg.student.dim})
    with StageTimer() as timer:
        for epoch in range(state["epoch"], dc.epochs):
            if state["bad_epochs"] >= dc.patience or state.get("pruned_at"):
                break
            train_dl.set_epoch(epoch)
            model.train()
            t0 = time.perf_counter()
            # resumed mid-epoch: the same order (seed + epoch), past the batches already done
            loader = accelerator.skip_first_batches(train_dl, state["step"]) if state["step"] else train_dl
            bar = tqdm(loader, desc=f"{dc.name} epoch {epoch + 1}", disable=not accelerator.is_local_main_process,
                       leave=False, initial=state["step"], total=len(train_dl))
            for batch in bar:
                if dc.length_buckets:
                    batch = trim_padding(batch, data.num_items)
                with accelerator.accumulate(model):
                    # (B, L, d), (N, d) table or (sparse) an ItemRows lookup
                    states, items = model(batch["input_ids"], batch["user"], rows=sparse,
                                          length_groups=dc.length_groups)
                    loss = distill_loss(states, items, batch, dc, log_q, kd_targets, kd_loss, heads, accelerator,
                                        neighbors)
                    if anchor is not None:  # (the start, re-derived on resume: the init is deterministic)
                        rows = accelerator.unwrap_model(model).item_tower.embedding.weight
                        loss = loss + cfg.student.content_init_anchor * (rows - anchor).pow(2).sum(1).mean()
                    accelerator.backward(loss)
                    for optimizer in optimizers:
                        optimizer.step()
                        optimizer.zero_grad()
                state["step"] += 1
                state["loss_sum"] += loss.item()
                bar.set_postfix(loss=f"{state['loss_sum'] / state['step']:.4f}")
                if dc.checkpoint_every and state["step"] % dc.checkpoint_every == 0 and state["step"] < len(train_dl):
                    save_checkpoint(accelerator, ckpt_dir, state)
            metrics = validate(model, eval_dl, data, accelerator, item_block=cfg.eval.item_block)
            end_epoch(state, metrics, epoch, time.perf_counter() - t0)
            if state["best_epoch"] == epoch + 1 and accelerator.is_main_process:
                with atomic_dir(ckpt_dir / "best") as tmp:
                    accelerator.unwrap_model(model).save_pretrained(tmp)
            row = state["history"][-1]
            valid = (f"{row['ndcg@10']:.4f}" if math.isfinite(row["ndcg@10"]) else
                     "diverged (non-finite valid scores; the epoch cannot be the best)")
            accelerator.print(f"{dc.name} epoch {epoch + 1}: loss {row['train_loss']:.4f} valid ndcg@10 "
                              f"{valid} (best {state['best_ndcg']:.4f} @ {state['best_epoch']})")
            if dc.log_with:
                accelerator.log({k if k in ("train_loss",) else f"valid/{k}": v for k, v in row.items()
                                 if k not in ("epoch", "seconds")}, step=epoch + 1)
            if on_epoch is not None and on_epoch(epoch + 1, row["ndcg@10"]):
                state["pruned_at"] = epoch + 1
                accelerator.print(f"{dc.name}: pruned after epoch {epoch + 1} (llmkd.distill.pruning)")
            save_checkpoint(accelerator, ckpt_dir, state)
    if dc.log_with:
        accelerator.end_training()
    if state["best_epoch"] < 1:
        raise LlmkdError(f"distill.name {dc.name}: every epoch diverged (non-finite valid scores), nothing exported; "
                         "try a lower distill.lr")
    result = {"best_epoch": state["best_epoch"], "best_valid_ndcg@10": state["best_ndcg"],
              "epochs_run": state["epoch"], "pruned_at_epoch": state.get("pruned_at"), "history": state["history"]}
    if accelerator.is_main_process:
        net = TwoTower.from_pretrained(ckpt_dir / "best")
        meta = new_meta("student", cfg.to_dict(), data.fingerprint, **result,
                        teacher_fingerprint=teacher_fingerprint(out / dc.teacher) if cfg.uses_teacher else None,
                        inputs={"teacher": input_record(out, out / dc.teacher)} if cfg.uses_teacher else {},
                        hard_loss=dc.loss, item_updates="sparse" if sparse else "dense", kd_search=kd_targets.search if kd_targets is not None else None,
                        num_parameters=net.num_parameters(), num_processes=accelerator.num_processes,
                        distributed_type=str(accelerator.distributed_type), timing=timer.as_dict())
        with atomic_dir(out / dc.name) as tmp:
            net.save_pretrained(tmp)
            write_json(tmp / "meta.json", meta)
            write_json(tmp / "resolved_config.json", cfg.to_dict())
    accelerator.wait_for_everyone()
    return result


def end_epoch(state: dict, metrics: dict[str, float], epoch: int, seconds: float) -> None:
    """Record an epoch's valid metrics in `state`, update the best epoch and patience, reset the step;
    a diverged epoch (non-finite metrics) is never the best."""
    state["history"].append({"epoch": epoch + 1, "train_loss": state["loss_sum"] / max(state["step"], 1),
                             **metrics, "seconds": round(seconds, 2)})
    state.update(epoch=epoch + 1, step=0, loss_sum=0.0)
    if math.isfinite(metrics["ndcg@10"]) and metrics["ndcg@10"] > state["best_ndcg"]:
        state.update(best_ndcg=metrics["ndcg@10"], best_epoch=epoch + 1, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
