"""LoRA tuning of the teacher (PEFT): contrastive history text -> next item text, with Accelerate.

A training pair is a random cut of a user's train sequence: the history before position t (rendered
as text exactly as the teacher stage renders it) and the item at t. The loss is InfoNCE at
`temperature` over the batch's positives (in-batch negatives) plus `catalog_negatives` items from a
no-grad bank of all item vectors, refreshed at every evaluation. Only the train split is used;
valid NDCG@10 on a fixed subset of users picks the exported adapter (early stopping).

Artifact `<out_dir>/<finetune.output>/`: adapter_config.json + adapter_model.safetensors (a standard
PEFT adapter), meta.json (valid curve, timing), valid_curve.png.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from llmkd.artifacts import LlmkdError, StageTimer, atomic_dir, new_meta, write_json
from llmkd.config import Config
from llmkd.data import RecData
from llmkd.evaluate import mask_seen, metrics_from_ranks, target_ranks
from llmkd.teacher import TextEncoder, item_prompts, user_prompt

TARGET_MODULES = {
    "bert": (["query", "key", "value", "dense"], "layer"),
    "gpt2": (["c_attn", "c_proj", "c_fc"], "h"),
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "layers"),
}


def lora_config(model_config, cfg):
    """A PEFT LoraConfig for the teacher's architecture (top `cfg.top_layers` layers when > 0)."""
    from peft import LoraConfig

    modules, pattern = TARGET_MODULES.get(model_config.model_type, (None, None))
    modules = cfg.target_modules or modules
    if modules is None:
        raise LlmkdError(f"finetune.target_modules: no default for model type '{model_config.model_type}'; "
                         "list the projection module names to adapt")
    layers = None
    if cfg.top_layers:
        n = model_config.num_hidden_layers
        layers = list(range(max(0, n - cfg.top_layers), n))
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=modules, layers_to_transform=layers,
                      layers_pattern=pattern if layers else None)


def train_pairs(data: RecData) -> np.ndarray:
    """All (user, t) cuts of train sequences with t >= 1: (n_pairs, 2) int64."""
    return np.array([(u, t) for u, seq in enumerate(data.train) for t in range(1, len(seq))], dtype=np.int64)


@torch.no_grad()
def valid_ndcg(enc: TextEncoder, data: RecData, users: np.ndarray, cfg: Config) -> tuple[float, torch.Tensor]:
    """NDCG@10 of the current teacher on `users`' valid items, and the fresh item bank (n_items, d)."""
    enc.model.eval()
    tc = cfg.teacher
    items = torch.as_tensor(enc.encode(item_prompts(data.item_texts, tc), tc.max_item_tokens))
    hists = [data.history(u, "valid") for u in users]
    texts = [user_prompt(data.item_texts, h, tc) for h in hists]
    user_vecs = torch.as_tensor(enc.encode(texts, tc.max_history_tokens))
    scores = mask_seen(user_vecs @ items.T, hists)
    ranks = target_ranks(scores, torch.as_tensor(data.valid_item[users])).numpy()
    enc.model.train()
    return float(metrics_from_ranks(ranks, (10,))["ndcg@10"].mean()), items


def contrastive_loss(queries: torch.Tensor, positives: torch.Tensor, pos_ids: torch.Tensor,
                     bank: torch.Tensor, bank_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: queries (B, d), positives (B, d) with item ids (B,), bank (S, d) with ids (S,).

    Candidates of row i: every positive of the batch, then the bank; a candidate that is row i's own
    positive item anywhere but the diagonal is masked, so duplicates are never negatives.
    """
    logits = torch.cat([queries @ positives.T, queries @ bank.T], 1) / temperature  # (B, B + S)
    ids = torch.cat([pos_ids, bank_ids])  # (B + S,)
    same = ids[None, :] == pos_ids[:, None]
    same[torch.arange(len(pos_ids)), torch.arange(len(pos_ids))] = False
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(pos_ids), device=logits.device))


def finetune_teacher(data: RecData, cfg: Config) -> dict:
    """Train a LoRA adapter for the teacher and export the best valid step to `<out_dir>/<finetune.output>`."""
    from peft import get_peft_model

    fc, tc = cfg.finetune, cfg.teacher
    out = Path(cfg.out_dir) / fc.output
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(fc.seed)
    enc = TextEncoder(tc.model, tc.pooling, tc.batch_size, device=str(accelerator.device))
    enc.model = enc.model.float()
    enc.model = get_peft_model(enc.model, lora_config(enc.model.config, fc))
    trainable = sum(p.numel() for p in enc.model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in enc.model.parameters() if p.requires_grad], lr=fc.lr)
    enc.model, optimizer = accelerator.prepare(enc.model, optimizer)
    rng = np.random.default_rng(fc.seed)
    pairs = train_pairs(data)
    if len(pairs) == 0:
        raise LlmkdError("data: no user has 2 or more train interactions; nothing to tune the teacher on")
    users = data.eval_users("valid")
    if fc.eval_users and len(users) > fc.eval_users:
        users = np.sort(rng.choice(users, fc.eval_users, replace=False))
    item_tokens = enc.tokenize(item_prompts(data.item_texts, tc), tc.max_item_tokens)
    curve, best, bad = [], -1.0, 0
    best_dir = Path(tempfile.mkdtemp(prefix="llmkd-lora-"))
    with StageTimer() as timer:
        ndcg, bank = valid_ndcg(enc, data, users, cfg)
        curve.append({"step": 0, "valid_ndcg@10": ndcg})
        accelerator.print(f"finetune step 0 (zero-shot): valid ndcg@10 {ndcg:.4f} on {len(users)} users")
        best = ndcg
        accelerator.unwrap_model(enc.model).save_pretrained(best_dir)
        enc.model.train()
        bar = tqdm(range(1, fc.steps + 1), desc="finetune teacher", disable=not accelerator.is_local_main_process)
        total, t0 = 0.0, time.perf_counter()
        for step in bar:
            batch = pairs[rng.integers(0, len(pairs), fc.batch_size)]
            hists = [data.train[u][:t] for u, t in batch]
            pos = np.array([data.train[u][t] for u, t in batch])
            texts = [user_prompt(data.item_texts, h, tc) for h in hists]
            q = enc.embed(enc.tokenize(texts, tc.max_history_tokens))  # (B, d)
            p = enc.embed([item_tokens[i] for i in pos])  # (B, d)
            neg = rng.integers(0, data.num_items, min(fc.catalog_negatives, data.num_items))
            loss = contrastive_loss(q, p, torch.as_tensor(pos, device=q.device), bank[neg].to(q.device),
                                    torch.as_tensor(neg, device=q.device), fc.temperature)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item()
            bar.set_postfix(loss=f"{total / ((step - 1) % fc.eval_every + 1):.3f}")
            if step % fc.eval_every == 0 or step == fc.steps:
                ndcg, bank = valid_ndcg(enc, data, users, cfg)
                row = {"step": step, "valid_ndcg@10": ndcg, "train_loss": total / ((step - 1) % fc.eval_every + 1),
                       "seconds": round(time.perf_counter() - t0, 1)}
                curve.append(row)
                total = 0.0
                if ndcg > best:
                    best, bad = ndcg, 0
                    accelerator.unwrap_model(enc.model).save_pretrained(best_dir)
                else:
                    bad += 1
                accelerator.print(f"finetune step {step}: loss {row['train_loss']:.3f} valid ndcg@10 {ndcg:.4f} "
                                  f"(best {best:.4f})")
                if bad >= fc.patience:
                    break
    meta = new_meta("teacher_lora", cfg.to_dict(), data.fingerprint, base_model=enc.path, curve=curve,
                    best_valid_ndcg_at_10=best, zero_shot_valid_ndcg_at_10=curve[0]["valid_ndcg@10"],
                    eval_users=len(users), trainable_parameters=trainable, timing=timer.as_dict())
    if accelerator.is_main_process:
        with atomic_dir(out) as tmp:
            for f in best_dir.iterdir():
                (tmp / f.name).write_bytes(f.read_bytes())
            write_json(tmp / "meta.json", meta)
            plot_curve(curve, tmp / "valid_curve.png")
    shutil.rmtree(best_dir, ignore_errors=True)
    return meta


def plot_curve(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in curve], [r["valid_ndcg@10"] for r in curve], marker="o")
    ax.set_xlabel("LoRA training step")
    ax.set_ylabel("teacher valid NDCG@10")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
