"""What one training step of the configured student costs on its own data, for settings that change the
work but not what is learnt (`distill.length_groups`), measured side by side in one process: the same
batches, each setting timed in turn within every repetition, so a shared machine's load falls on all of
them alike. Only the ratios are comparable across runs, never the seconds.

    {"config": ..., "threads": 1, "batches": 8, "reps": 3, "settings": [{"length_groups": 1, "step_s": ...,
     "speedup": 1.0, "tower_tokens": ...}, ...], "env": {...}}
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np


def tower_tokens(real, groups: int) -> int:
    """History positions the user tower runs over for one batch ((B, L) bool real-item mask) in `groups`
    length groups, padding included: what `TwoTower.grouped_states` saves."""
    lengths = np.sort(real.sum(1).numpy())
    return int(sum(len(part) * part.max() for part in np.array_split(lengths, groups) if len(part)))


def student_step_cost(cfg, groups: list[int], batches: int = 8, reps: int = 3, threads: int = 1,
                      seed: int = 0) -> dict:
    """Median seconds per optimizer step (forward, hard loss, backward, AdamW) of `cfg`'s student on the
    first `batches` training batches of its data, for each `distill.length_groups` value in `groups`."""
    import torch

    from llmkd.data import load_data
    from llmkd.distill import hard_loss
    from llmkd.distill.windows import get_dataloaders
    from llmkd.student import TwoTower

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = load_data(Path(cfg.out_dir) / "data")
    dc = dataclasses.replace(cfg.distill, loss=cfg.distill.hard_loss_for(data.num_items))
    if dc.loss != "full_softmax":
        raise SystemExit(f"{dc.loss}: this benchmark times the full-softmax student (set distill.loss)")
    train_dl, _ = get_dataloaders(data, cfg)
    model = TwoTower.from_config(cfg.student, data.num_items, cfg.data.max_history, data.num_users)
    optimizer = torch.optim.AdamW(model.parameters(), lr=dc.lr)
    sample = [b for _, b in zip(range(batches), train_dl)]

    def step(batch: dict, g: int) -> None:
        states, items = model(batch["input_ids"], batch["user"], length_groups=g)
        hard_loss(states, items, batch["labels"], dc, None).backward()
        optimizer.step()
        optimizer.zero_grad()

    for g in groups:  # warm-up: allocator and kernels for every shape
        step(sample[0], g)
    times = {g: [] for g in groups}
    for _ in range(reps):
        for g in groups:
            for batch in sample:
                t0 = time.perf_counter()
                step(batch, g)
                times[g].append(time.perf_counter() - t0)
    real = [b["input_ids"] != data.num_items for b in sample]
    base = float(np.median(times[groups[0]]))
    return {"batches": batches, "reps": reps, "threads": threads, "batches_per_epoch": len(train_dl),
            "positions_per_batch": float(np.mean([int((b["labels"] != -100).sum()) for b in sample])),
            "settings": [{"length_groups": g, "step_s": float(np.median(times[g])),
                          f"speedup_over_{groups[0]}": base / float(np.median(times[g])),
                          "tower_tokens_per_batch": float(np.mean([tower_tokens(r, g) for r in real]))}
                         for g in groups]}
