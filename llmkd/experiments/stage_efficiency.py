"""How close each heavy stage of the pipeline runs to what this machine can do: for one unit of each stage
(a LoRA tuning step, a batch of item texts and of history texts through the teacher, a student training
step with the full and with the sampled softmax, a validation pass over every user), the matrix FLOPs it
needs (`torch.utils.flop_counter.FlopCounterMode`: matrix products and attention, not elementwise work),
the seconds it takes (median of `reps`), and so the fraction of the machine's peak it reaches. The peak
is measured the same way: the GFLOP/s of a large fp32 matrix product at the same torch threads.

    {"peak_gflops": ..., "threads": 2, "stages": {"teacher_items": {"unit": "64 item texts", "unit_s": ...,
     "unit_gflop": ..., "gflops": ..., "fraction_of_peak": ..., "units_per_stage": ..., "stage_s": ...}, ...},
     "furthest_from_bound": "<stage>"}

`stage_s` is the unit's seconds times the units one run of the stage needs on this data (one epoch for
the student, one cache for the teacher, `finetune.steps` for the LoRA tuning), an estimate, not a timing
of the whole stage. A low fraction is work the FLOPs do not explain: Python and framework overhead,
memory traffic, padding, small matrices.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def peak_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of fp32 matrix products, square ones of side n/2, n and 2n and one shaped like a
    transformer's feed-forward, (4n x n/4) @ (n/4 x 3n/4): the machine's attainable matrix peak."""
    import torch

    best = 0.0
    for m, k, j in ((n // 2,) * 3, (n,) * 3, (2 * n,) * 3, (4 * n, n // 4, 3 * n // 4)):
        a, b = torch.randn(m, k), torch.randn(k, j)
        a @ b  # warm-up
        best = max(best, 2 * m * k * j / min(timed(lambda a=a, b=b: a @ b) for _ in range(reps)) / 1e9)
    return best


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(unit: str, fn: Callable[[], object], reps: int, units_per_stage: float, peak: float) -> dict:
    """One stage's row: `fn` run once under the FLOP counter, then `reps` timed runs (after one warm-up)."""
    from torch.utils.flop_counter import FlopCounterMode

    fn()
    with FlopCounterMode(display=False) as counter:
        fn()
    flop = counter.get_total_flops()
    seconds = statistics.median(timed(fn) for _ in range(reps))
    return {"unit": unit, "unit_s": seconds, "unit_gflop": flop / 1e9, "gflops": flop / seconds / 1e9,
            "fraction_of_peak": flop / seconds / 1e9 / peak, "units_per_stage": units_per_stage,
            "stage_s": seconds * units_per_stage}


def lora_batch(data, enc, cfg, rng: np.random.Generator) -> tuple[list, list, np.ndarray, int]:
    """One LoRA tuning batch as the tuner draws it: `finetune.batch_size` (user, cut) histories with their
    next items, plus `catalog_negatives` random items; (history token ids, item token ids, item ids, n)."""
    from llmkd.teacher import item_prompts, user_prompt
    from llmkd.teacher.finetune import train_pairs

    fc, tc = cfg.finetune, cfg.teacher
    pairs = train_pairs(data)
    rows = pairs[rng.integers(0, len(pairs), fc.batch_size)]
    items = np.concatenate([[data.train[u][t] for u, t in rows],
                            rng.choice(data.num_items, fc.catalog_negatives, replace=False)])
    hist = enc.tokenize([user_prompt(data.item_texts, data.train[u][:t], tc) for u, t in rows], tc.max_history_tokens)
    return hist, enc.tokenize(item_prompts([data.item_texts[i] for i in items], tc), tc.max_item_tokens), items, len(rows)


def teacher_stages(cfg, data, reps: int, peak: float, n_texts: int) -> dict:
    """Item texts and history texts through the zero-shot teacher, and one LoRA step (cached lower layers)."""
    import torch
    from peft import get_peft_model

    from llmkd.teacher import TextEncoder, item_prompts, state_histories, user_prompt
    from llmkd.teacher.finetune import Featurizer, contrastive_loss, lora_config

    tc, fc = cfg.teacher, cfg.finetune
    enc = TextEncoder(tc.model, tc.pooling, tc.batch_size)
    rng = np.random.default_rng(0)
    items = item_prompts([data.item_texts[i] for i in rng.choice(data.num_items, n_texts, replace=False)], tc)
    states = [h for hs in state_histories(data).values() for h in hs]
    hists = [user_prompt(data.item_texts, states[i], tc) for i in rng.choice(len(states), n_texts, replace=False)]
    out = {"teacher_items": measure(f"{n_texts} item texts", lambda: enc.encode(items, tc.max_item_tokens), reps,
                                    data.num_items / n_texts, peak)}
    if tc.user_mode == "text":
        out["teacher_histories"] = measure(f"{n_texts} history texts",
                                           lambda: enc.encode(hists, tc.max_history_tokens), reps,
                                           len(states) / n_texts, peak)
    top = fc.top_layers or enc.model.config.num_hidden_layers
    enc.model = get_peft_model(enc.model.float(), lora_config(enc.model.config, fc))
    feat = Featurizer(enc, enc.model.config.num_hidden_layers - top if fc.top_layers else 0)
    hist, item_ids, ids, n = lora_batch(data, enc, cfg, rng)
    cached = (feat.prepare(hist), feat.prepare(item_ids))
    ids = torch.as_tensor(ids)

    def step() -> None:
        q, v = feat(hist, cached[0]), feat(item_ids, cached[1])
        contrastive_loss(q, v[:n], ids[:n], v[n:], ids[n:], fc.temperature).backward()
        enc.model.zero_grad()

    enc.model.train(False)
    out["lora_step"] = measure(f"1 step: {fc.batch_size} histories, {len(ids)} items, top {top} layers", step,
                               reps, fc.steps, peak)
    return out


def student_stages(cfg, data, reps: int, peak: float, batches: int) -> dict:
    """One training step of the student with the full and with the sampled softmax, one validation pass."""
    import torch
    from accelerate import Accelerator

    from llmkd.distill import hard_loss, popularity_log_q, validate
    from llmkd.distill.windows import get_dataloaders
    from llmkd.student import TwoTower

    torch.manual_seed(0)
    train_dl, eval_dl = get_dataloaders(data, cfg)
    sample = [b for _, b in zip(range(batches), train_dl)]
    model = TwoTower.from_config(cfg.student, data.num_items, cfg.data.max_history, data.num_users)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.distill.lr)
    log_q = popularity_log_q(data)
    out = {}
    for loss in ("full_softmax", "sampled_softmax"):
        dc = dataclasses.replace(cfg.distill, loss=loss)

        def epoch_part(dc=dc) -> None:
            for batch in sample:
                states, items = model(batch["input_ids"], batch["user"], length_groups=dc.length_groups)
                hard_loss(states, items, batch["labels"], dc, log_q).backward()
                optimizer.step()
                optimizer.zero_grad()

        out[f"student_epoch_{loss}"] = measure(f"{batches} training steps, batch {dc.batch_size}", epoch_part, reps,
                                               len(train_dl) / batches, peak)
    accelerator = Accelerator(cpu=True)
    out["evaluate_valid"] = measure(f"validation of {len(data.eval_users('valid'))} users",
                                    lambda: validate(model, eval_dl, data, accelerator), max(1, reps // 2), 1, peak)
    return out


def stage_efficiency(cfg, reps: int = 3, threads: int = 2, n_texts: int = 256, batches: int = 8,
                     peak_n: int = 2048) -> dict:
    """Every stage's row (see the module docstring) on `cfg`'s prepared data, at `threads` torch threads;
    the peak from products of about peak_n (`peak_gflops`)."""
    import torch

    from llmkd.data import load_data

    torch.set_num_threads(threads)
    data = load_data(Path(cfg.out_dir) / "data")
    peak = peak_gflops(peak_n)
    stages = {**teacher_stages(cfg, data, reps, peak, n_texts), **student_stages(cfg, data, reps, peak, batches)}
    return {"threads": threads, "peak_gflops": peak, "reps": reps, "stages": stages,
            "furthest_from_bound": min(stages, key=lambda s: stages[s]["fraction_of_peak"]),
            "items": data.num_items, "users": data.num_users}


def plot(result: dict, path: str | Path) -> None:
    """Bars: each stage's fraction of the measured matrix peak, its estimated seconds beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["stages"])
    frac = [result["stages"][s]["fraction_of_peak"] for s in names]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names, frac, color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fraction of the fp32 matrix peak ({result['peak_gflops']:.0f} GFLOP/s, "
                  f"{result['threads']} threads)")
    for y, s in enumerate(names):
        ax.text(frac[y], y, f"  {result['stages'][s]['stage_s']:.0f} s / stage", va="center", fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
