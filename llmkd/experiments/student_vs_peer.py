"""Training speed of llmkd's student beside the peer library's SASRec (RecTools, `llmkd.experiments.peer_training`)
on the same data, batch size and torch threads, timed side by side: in each round every system trains one
timing's worth of batches, in turn, the order reversed every other round, so a change of load on a shared
machine reaches them all alike.

    student_runner(cfg, data, batches)             llmkd's training step (`llmkd.distill`'s loss), full batches
    peer_runner(data, settings, batches, ...)      RecTools' SASRec: its own loss path, or the peer run's
    side_by_side(runners, rounds)                  {name: [seconds per round]}
    student_vs_peer(cfg, data, settings, ...)      the JSON: per system the median seconds per batch and per
                                                   epoch (its own batches per epoch), each epoch time over
                                                   the student's at the peer's width (`epoch_vs_baseline`)

Only the training steps count, each with its data loading: not evaluation, not RecTools' dataset processing
at the start of a fit (the peer's time is read from Lightning's epoch start and end).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

from llmkd.data import RecData
from llmkd.experiments.peer_training import build_model, fit_chunk, quiet_lightning
from llmkd.experiments.peers import PeerSettings, interactions_table
from llmkd.infra.config import Config

Runner = Callable[[], float]  # trains a fixed number of batches, returns the seconds it took


def student_runner(cfg: Config, data: RecData, batches: int) -> tuple[Runner, int]:
    """(runner, batches per epoch) for llmkd's student at `cfg`: its data loader, tower and hard loss, AdamW,
    as `llmkd.distill` trains it (without Accelerate's wrapper, a no-op on one CPU process)."""
    import torch

    from llmkd.distill import hard_loss, popularity_log_q
    from llmkd.distill.windows import get_dataloaders
    from llmkd.student import TwoTower

    torch.manual_seed(cfg.distill.seed)
    train_dl, _ = get_dataloaders(data, cfg)
    model = TwoTower.from_config(cfg.student, data.num_items, cfg.data.max_history, data.num_users)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.distill.lr, weight_decay=cfg.distill.weight_decay)
    log_q = popularity_log_q(data)
    dc = dataclasses.replace(cfg.distill, loss=cfg.distill.hard_loss_for(data.num_items))  # 'auto' resolved
    loader = iter(train_dl)

    def run() -> float:
        nonlocal loader
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(loader, None)
            if batch is None:
                loader = iter(train_dl)
                batch = next(loader)
            states, items = model(batch["input_ids"], batch["user"], length_groups=dc.length_groups)
            hard_loss(states, items, batch["labels"], dc, log_q).backward()
            optimizer.step()
            optimizer.zero_grad()
        return time.perf_counter() - start

    return run, len(train_dl)


def peer_runner(data: RecData, settings: PeerSettings, batches: int, targets_only: bool = True) -> tuple[Runner, int]:
    """(runner, batches per epoch) for RecTools' SASRec at `settings`: each call is a one-epoch fit of
    `batches` batches (Lightning's `limit_train_batches`); `targets_only=False` is RecTools' own loss path."""
    import pytorch_lightning as pl
    from rectools.dataset import Dataset

    seconds: list[float] = []

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            seconds.append(time.perf_counter() - self.start)

    model = build_model(settings, targets_only)
    model._trainer = pl.Trainer(max_epochs=1, min_epochs=1, limit_train_batches=batches, callbacks=[Clock()],
                                enable_progress_bar=False, enable_model_summary=False, logger=False,
                                enable_checkpointing=False, devices=1, accelerator="cpu")
    table = interactions_table(data, "valid")
    dataset = Dataset.construct(table)
    users = int((table.groupby("user_id").size() >= 2).sum())  # RecTools trains on users with >= 2 items

    def run() -> float:
        with quiet_lightning():
            fit_chunk(model, dataset, 1)
        return seconds[-1]

    return run, math.ceil(users / settings.batch_size)


def side_by_side(runners: dict[str, Runner], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every runner in every round: `warmup` untimed rounds first, then the runners in turn, the
    order reversed every other round."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(runners[name]())
    return times


def student_vs_peer(cfg: Config, data: RecData, settings: PeerSettings, dims: list[int], batches: int = 8,
                    rounds: int = 3, threads: int = 2, log: Callable[[str], object] = print) -> dict:
    """The side-by-side timing (module doc) of llmkd's student at each of `dims` (otherwise `cfg`) and the
    peer with its own loss path and with the peer run's (logits at targets only), at `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    assert cfg.distill.batch_size == settings.batch_size, "the same batch size for both"
    runners, per_epoch = {}, {}
    for dim in dims:
        name = f"llmkd student, {dim}-d"
        runners[name], per_epoch[name] = student_runner(
            dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, dim=dim)), data, batches)
    for name, targets_only in (("RecTools SASRec, its own loss", False), ("RecTools SASRec, loss at targets", True)):
        runners[name], per_epoch[name] = peer_runner(data, settings, batches, targets_only)
    log(f"timing {len(runners)} systems, {rounds} rounds of {batches} batches, {threads} threads")
    times = side_by_side(runners, rounds)
    base = f"llmkd student, {settings.dim}-d" if settings.dim in dims else next(iter(runners))
    systems = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        systems[name] = {"seconds": ts, "median_s": median, "batch_s": median / batches,
                         "batches_per_epoch": per_epoch[name], "epoch_s": median / batches * per_epoch[name]}
    for s in systems.values():
        s["epoch_vs_baseline"] = s["epoch_s"] / systems[base]["epoch_s"]
    return {"threads": threads, "rounds": rounds, "batches": batches, "batch_size": settings.batch_size,
            "baseline": base, "peer_settings": settings.as_json(), "systems": systems}


def markdown(result: dict) -> str:
    base = result["baseline"]
    lines = [(f"Training speed side by side ({result['threads']} threads, batch {result['batch_size']}, median of "
              f"{result['rounds']} rounds of {result['batches']} batches):"), "",
             f"| system | s / batch | batches / epoch | s / epoch | epoch time / {base} |", "|---|---|---|---|---|"]
    for name, s in result["systems"].items():
        lines.append(f"| {name} | {s['batch_s']:.3f} | {s['batches_per_epoch']} | {s['epoch_s']:.1f} | "
                     f"{s['epoch_vs_baseline']:.2f}x |")
    return "\n".join(lines)
