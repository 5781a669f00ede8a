"""LoRA tuning of the teacher (PEFT): contrastive history text -> next item text, with Accelerate.

A training pair is a random cut of a user's train sequence: the history before position t (rendered
as text exactly as the teacher stage renders it) and the item at t. The loss is InfoNCE at
`temperature` over the batch's positives (in-batch negatives) plus `catalog_negatives` items drawn
uniformly from the catalog each step and encoded by the current model. (A stale no-grad bank of item
vectors was tried first: the model learned to tell fresh vectors from stale ones and valid NDCG fell.)
Only the train split is used; valid NDCG@10 on a fixed subset of users picks the exported adapter.

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
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from llmkd.data import RecData
from llmkd.evaluation.metrics import mask_seen, metrics_from_ranks, target_ranks
from llmkd.infra.artifacts import LlmkdError, StageTimer, atomic_dir, new_meta, read_meta, write_json
from llmkd.infra.config import Config
from llmkd.infra.lineage import files_load
from llmkd.infra.locks import main_process_lock
from llmkd.teacher import TextEncoder, item_prompts, model_fingerprint, resolve_model_path, user_prompt
from llmkd.teacher.parallel import GatherWithGrad, average_gradients, negatives_per_process

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


class Featurizer:
    """Token ids -> teacher vectors during tuning, either through the whole model (with autograd) or,
    when only the top layers are adapted, from their cached frozen-lower-layer states (`SplitEncoder`)."""

    def __init__(self, enc: TextEncoder, split: int = 0) -> None:
        self.enc = enc
        self.split = SplitEncoder(enc, split) if split else None

    def prepare(self, token_ids: list[list[int]], desc: str | None = None) -> list | None:
        """What a later `__call__` on these texts needs: cached lower states, or nothing."""
        return self.split.lower(token_ids, self.enc.batch_size, desc) if self.split else None

    def __call__(self, token_ids: list[list[int]], cached: list | None = None) -> torch.Tensor:
        """(n, d) vectors with autograd; texts are grouped by token length into chunks of `batch_size`
        so that short item texts are not padded to the longest one."""
        order = np.argsort([len(ids) for ids in token_ids], kind="stable")
        parts = []
        for start in range(0, len(order), self.enc.batch_size):
            idx = order[start : start + self.enc.batch_size]
            ids = [token_ids[i] for i in idx]
            parts.append(self.split.upper(ids, [cached[i] for i in idx]) if self.split else self.enc.embed(ids))
        return torch.cat(parts)[torch.as_tensor(np.argsort(order), device=parts[0].device)]

    @torch.no_grad()
    def vectors(self, token_ids: list[list[int]], cached: list | None = None) -> torch.Tensor:
        """(n, d) vectors for many texts, without autograd, on the CPU."""
        return self(token_ids, cached).float().cpu()


def ndcg_at_10(user_vecs: torch.Tensor, items: torch.Tensor, hists: list[np.ndarray], targets: np.ndarray) -> float:
    """Mean NDCG@10 of cosine scores with seen items masked."""
    ranks = target_ranks(mask_seen(user_vecs @ items.T, hists), torch.as_tensor(targets)).numpy()
    return float(metrics_from_ranks(ranks, (10,))["ndcg@10"].mean())


def contrastive_loss(queries: torch.Tensor, positives: torch.Tensor, pos_ids: torch.Tensor,
                     negatives: torch.Tensor, neg_ids: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """InfoNCE: queries (B, d), positives (G, d) with item ids (G,), negatives (S, d) with ids (S,); query j's
    own positive is positives[offset + j] (G = B, offset 0 in one process; with several, G is the global
    batch and `offset` this process's first row in it).

    Candidates of row j: every positive of the (global) batch, then the negatives; a candidate that is row
    j's own positive item anywhere but its own column is masked, so duplicates are never negatives.
    """
    logits = torch.cat([queries @ positives.T, queries @ negatives.T], 1) / temperature  # (B, G + S)
    target = torch.arange(offset, offset + len(queries), device=logits.device)  # (B,)
    ids = torch.cat([pos_ids, neg_ids])  # (G + S,)
    same = ids[None, :] == pos_ids[target][:, None]
    same[torch.arange(len(queries)), target] = False
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, target)


def tuning_key(data: RecData, cfg: Config, processes: int = 1) -> dict:
    """What an adapter depends on: the finetune config, the teacher config that renders its texts, the
    base model's contents, the data and (when > 1) the processes, whose batches add up to the global
    batch. A matching existing adapter is reused."""
    from dataclasses import asdict

    teacher = {k: v for k, v in asdict(cfg.teacher).items() if k not in ("adapter", "batch_size", "shard_size")}
    path = resolve_model_path(cfg.teacher.model)
    return {"finetune": asdict(cfg.finetune), "teacher": teacher, "model_fingerprint": model_fingerprint(path),
            "data_fingerprint": data.fingerprint, **({"processes": processes} if processes > 1 else {})}


def finetune_teacher(data: RecData, cfg: Config, force: bool = False) -> dict:
    """Train a LoRA adapter for the teacher and export the best valid step to `<out_dir>/<finetune.output>`;
    reuse the adapter already there when `tuning_key` matches and its files load (unless `force`). Holds
    the adapter's lock throughout."""
    out = Path(cfg.out_dir) / cfg.finetune.output
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    with main_process_lock(accelerator, out):
        key = tuning_key(data, cfg, accelerator.num_processes)
        if not force and (out / "meta.json").is_file():
            meta = read_meta(out, "teacher_lora")
            if meta.get("key") == key and (out / "adapter_model.safetensors").is_file() and files_load(out):
                return {"reused": True, **meta}
        return _tune(data, cfg, accelerator, key, out)


def _tune(data: RecData, cfg: Config, accelerator: Accelerator, key: dict, out: Path) -> dict:
    """`finetune_teacher`'s training, under the lock."""
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup

    fc, tc = cfg.finetune, cfg.teacher
    set_seed(fc.seed)
    enc = TextEncoder(tc.model, tc.pooling, tc.batch_size, device=str(accelerator.device))
    enc.model = enc.model.float()
    n_layers = enc.model.config.num_hidden_layers
    enc.model = get_peft_model(enc.model, lora_config(enc.model.config, fc))
    params = [p for p in enc.model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    procs, rank = accelerator.num_processes, accelerator.process_index
    if procs > 1:  # one set of starting weights everywhere
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, 0)
    optimizer = torch.optim.AdamW(params, lr=fc.lr)
    # Not prepared by Accelerate: its scheduler wrapper steps once per process; this one steps once per step.
    scheduler = get_linear_schedule_with_warmup(optimizer, fc.warmup_steps, fc.steps)
    rng = np.random.default_rng(fc.seed)  # the same draws in every process: each takes its own rows of them
    pairs = train_pairs(data)
    if len(pairs) == 0:
        raise LlmkdError("data: no user has 2 or more train interactions; nothing to tune the teacher on")
    split = n_layers - fc.top_layers if fc.cache_lower_layers and 0 < fc.top_layers < n_layers else 0
    if split and fc.cache_pairs and len(pairs) > fc.cache_pairs:  # a fixed set of training cuts, cached once
        pairs = pairs[np.sort(rng.choice(len(pairs), fc.cache_pairs, replace=False))]
    users = data.eval_users("valid")
    if fc.eval_users and len(users) > fc.eval_users:
        users = np.sort(rng.choice(users, fc.eval_users, replace=False))
    eval_hists = [data.history(u, "valid") for u in users]
    feat = Featurizer(enc, split)
    with StageTimer() as timer:
        item_tok = enc.tokenize(item_prompts(data.item_texts, tc), tc.max_item_tokens)
        eval_tok = enc.tokenize([user_prompt(data.item_texts, h, tc) for h in eval_hists], tc.max_history_tokens)
        pair_tok = (enc.tokenize([user_prompt(data.item_texts, data.train[u][:t], tc) for u, t in pairs],
                                 tc.max_history_tokens) if split else None)
        item_c = feat.prepare(item_tok, "finetune: cache items")
        eval_c = feat.prepare(eval_tok, "finetune: cache valid histories")
        pair_c = feat.prepare(pair_tok, "finetune: cache training histories") if split else None
        cache_seconds = time.perf_counter() - timer.start

        def evaluate() -> float:
            items = feat.vectors(item_tok, item_c)
            ndcg = [ndcg_at_10(feat.vectors(eval_tok, eval_c), items, eval_hists, data.valid_item[users])]
            if procs > 1:  # every process decides early stopping on the main process's number
                broadcast_object_list(ndcg)
            return ndcg[0]

        best_dir = Path(tempfile.mkdtemp(prefix="llmkd-lora-"))
        ndcg = evaluate()
        curve = [{"step": 0, "valid_ndcg@10": ndcg}]
        accelerator.print(f"finetune step 0 (zero-shot): valid ndcg@10 {ndcg:.4f} on {len(users)} users")
        best, bad = ndcg, 0
        if accelerator.is_main_process:
            enc.model.save_pretrained(best_dir)
        # The model stays in eval mode: no dropout in the frozen base (faster CPU steps: results/teacher_lora_step_cpu.json);
        # LoRA weights still train.
        bar = tqdm(range(1, fc.steps + 1), desc="finetune teacher", disable=not accelerator.is_local_main_process)
        total, t0, train_seconds, first_step_seconds, step_losses = 0.0, time.perf_counter(), 0.0, 0.0, []
        b, s = fc.batch_size, negatives_per_process(fc.catalog_negatives, data.num_items, procs)
        for step in bar:
            t_step = time.perf_counter()
            all_rows = rng.integers(0, len(pairs), b * procs)  # the global batch; this process's rows:
            rows = all_rows[rank * b : (rank + 1) * b]
            all_pos = np.array([data.train[u][t] for u, t in pairs[all_rows]])
            if split:
                q = feat([pair_tok[r] for r in rows], [pair_c[r] for r in rows])
            else:
                texts = [user_prompt(data.item_texts, data.train[u][:t], tc) for u, t in pairs[rows]]
                q = feat(enc.tokenize(texts, tc.max_history_tokens))
            all_neg = rng.choice(data.num_items, s * procs, replace=False)
            # this process's positives and catalog negatives, encoded by the current model
            both = np.concatenate([all_pos[rank * b : (rank + 1) * b], all_neg[rank * s : (rank + 1) * s]])
            v = feat([item_tok[i] for i in both], [item_c[i] for i in both] if split else None)
            pos_v, neg_v = (GatherWithGrad.apply(v[:b]), GatherWithGrad.apply(v[b:])) if procs > 1 else (v[:b], v[b:])
            ids = torch.as_tensor(np.concatenate([all_pos, all_neg]), device=q.device)
            loss = contrastive_loss(q, pos_v, ids[: len(all_pos)], neg_v, ids[len(all_pos) :], fc.temperature,
                                    offset=rank * b)
            accelerator.backward(loss)
            if procs > 1:
                average_gradients(params, procs)
                loss = accelerator.reduce(loss.detach(), "mean")
            if fc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, fc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            train_seconds += time.perf_counter() - t_step
            first_step_seconds = first_step_seconds or train_seconds
            step_losses.append(loss.item())
            total += step_losses[-1]
            bar.set_postfix(loss=f"{total / ((step - 1) % fc.eval_every + 1):.3f}")
            if step % fc.eval_every == 0 or step == fc.steps:
                ndcg = evaluate()
                row = {"step": step, "valid_ndcg@10": ndcg, "train_loss": total / ((step - 1) % fc.eval_every + 1),
                       "seconds": round(time.perf_counter() - t0, 1)}
                curve.append(row)
                total = 0.0
                if ndcg > best:
                    best, bad = ndcg, 0
                    if accelerator.is_main_process:
                        enc.model.save_pretrained(best_dir)
                else:
                    bad += 1
                accelerator.print(f"finetune step {step}: loss {row['train_loss']:.3f} valid ndcg@10 {ndcg:.4f} "
                                  f"(best {best:.4f})")
                if bad >= fc.patience:
                    break
    meta = new_meta("teacher_lora", cfg.to_dict(), data.fingerprint, key=key, base_model=enc.path, curve=curve,
                    best_valid_ndcg_at_10=best, zero_shot_valid_ndcg_at_10=curve[0]["valid_ndcg@10"],
                    eval_users=len(users), trainable_parameters=trainable, cached_lower_layers=split,
                    training_cuts=len(pairs), cache_seconds=round(cache_seconds, 1), num_processes=procs,
                    global_batch_size=b * procs, catalog_negatives_per_step=s * procs, step_losses=step_losses,
                    train_seconds=round(train_seconds, 3), first_step_seconds=round(first_step_seconds, 3),
                    trainable_bytes=sum(p.numel() * p.element_size() for p in params),
                    timing=timer.as_dict())
    if accelerator.is_main_process:
        with atomic_dir(out) as tmp:
            for f in best_dir.iterdir():
                (tmp / f.name).write_bytes(f.read_bytes())
            write_json(tmp / "meta.json", meta)
            plot_curve(curve, tmp / "valid_curve.png")
    shutil.rmtree(best_dir, ignore_errors=True)
    return {"reused": False, **meta}


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


# ---------------------------------------------------------------- frozen lower layers, cached once

ENTRY_MODULE = {"bert": "embeddings", "gpt2": "drop", "llama": "embed_tokens"}
"""Per architecture, the module whose output enters the first transformer layer."""


def layer_stack(model) -> torch.nn.ModuleList:
    """The ModuleList of transformer layers inside a (PEFT-wrapped) HF base model."""
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise LlmkdError(f"finetune.cache_lower_layers: no list of {n} layers found in {type(model).__name__}")


class SplitEncoder:
    """A TextEncoder run in two parts at layer `split`: lower layers once per text, top layers per step.

    When LoRA adapts only the top `n - split` layers, the lower layers are frozen, so their output for
    a given text never changes: `lower` computes it once (no grad) and `upper` runs only the adapted
    layers on it. `upper(lower(ids)) == enc.embed(ids)` (tests/test_finetune.py). This is what makes
    LoRA tuning affordable on a CPU: a training step costs the top layers only.
    """

    def __init__(self, enc: TextEncoder, split: int) -> None:
        from accelerate.utils import extract_model_from_parallel

        self.enc = enc
        model = extract_model_from_parallel(enc.model)  # attributes are read from the model, not a DDP wrapper
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        mt = self.base.config.model_type
        if mt not in ENTRY_MODULE:
            raise LlmkdError(f"finetune.cache_lower_layers: not supported for model type '{mt}' "
                             f"(supported: {sorted(ENTRY_MODULE)}); set it to false")
        self.entry = self.base.get_submodule(ENTRY_MODULE[mt])
        self.layers = layer_stack(self.base)
        self.split = split

    def _run(self, token_ids: list[list[int]], layers: list, entry_hidden: torch.Tensor | None = None):
        """Run the model with its layer list swapped for `layers` (and the entry output replaced)."""
        full = list(self.layers)
        self.layers._modules.clear()
        for i, layer in enumerate(layers):
            self.layers._modules[str(i)] = layer
        hook = self.entry.register_forward_hook(lambda m, a, out: entry_hidden) if entry_hidden is not None else None
        try:
            batch = self.enc.tokenizer.pad({"input_ids": token_ids}, return_tensors="pt")
            batch = {k: v.to(self.enc.device) for k, v in batch.items()}
            if self.enc.pooling == "last":
                batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            captured = {}
            last = layers[-1].register_forward_hook(
                lambda m, a, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
            try:
                hidden = self.enc.model(**batch).last_hidden_state
            finally:
                last.remove()
            return batch["attention_mask"], hidden, captured["h"]
        finally:
            if hook is not None:
                hook.remove()
            self.layers._modules.clear()
            for i, layer in enumerate(full):
                self.layers._modules[str(i)] = layer

    @torch.no_grad()
    def lower(self, token_ids: list[list[int]], batch_size: int, desc: str | None = None) -> list[torch.Tensor]:
        """Hidden states after the frozen lower layers, one (L_i, d) float16 tensor per text (no padding)."""
        order = np.argsort([len(ids) for ids in token_ids], kind="stable")
        out: list[torch.Tensor | None] = [None] * len(token_ids)
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None):
            idx = order[start : start + batch_size]
            mask, _, hidden = self._run([token_ids[i] for i in idx], list(self.layers)[: self.split])
            for row, i in enumerate(idx):
                out[i] = hidden[row][mask[row].bool()].to(torch.float16).cpu()
        return out

    def upper(self, token_ids: list[list[int]], cached: list[torch.Tensor]) -> torch.Tensor:
        """(B, d) pooled, L2-normalised vectors from cached lower hidden states (autograd through the top)."""
        left = self.enc.tokenizer.padding_side == "left"
        width = max(len(h) for h in cached)
        d = cached[0].shape[-1]
        entry = torch.zeros(len(cached), width, d, dtype=torch.float32, device=self.enc.device)
        for row, h in enumerate(cached):
            if left:
                entry[row, width - len(h):] = h.to(entry)
            else:
                entry[row, : len(h)] = h.to(entry)
        mask, hidden, _ = self._run(token_ids, list(self.layers)[self.split :], entry_hidden=entry)
        return self.enc.pool(hidden, mask)
