"""Training batches of the student: each user's train sequence cut into history windows.

A window is the inputs (left-padded with `num_items`), the next-item label at every position and, for
KD, the row of the teacher's user vector for the history each position has seen. With
`distill.length_buckets`, windows of similar length are batched together and `trim_padding` drops the
columns that are padding in every window of a batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from llmkd.data import RecData
from llmkd.evaluation.metrics import sample_users
from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import Config
from llmkd.student import first_real_column


class WindowDataset(Dataset):
    """Train sequences cut into left-padded windows of `max_len` (input items, next-item labels).

    Item: {'input_ids': (L,) int64, 'labels': (L,) int64 (-100 = none), 'user': int64,
    'teacher_rows': (L,) int64}; `teacher_rows[j]` is the row of the teacher's user vector for the
    history ending at position j (see `llmkd.distill.kd_targets.KDTargets`), -1 where the teacher has none.
    """

    def __init__(self, train: list[np.ndarray], num_items: int, max_len: int,
                 teacher_rows: list[np.ndarray] | None = None) -> None:
        self.rows: list[tuple[int, int, int]] = []
        self.train, self.num_items, self.max_len = train, num_items, max_len
        self.teacher_rows = teacher_rows  # per user: (len + 1,) row of history train[:cut], -1 = none
        for u, seq in enumerate(train):
            for end in range(len(seq) - 1, 0, -max_len):
                self.rows.append((u, max(0, end - max_len), end))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        u, start, end = self.rows[i]
        seq = self.train[u]
        n = end - start
        x = torch.full((self.max_len,), self.num_items, dtype=torch.long)
        y = torch.full((self.max_len,), -100, dtype=torch.long)
        t = torch.full((self.max_len,), -1, dtype=torch.long)
        x[-n:] = torch.as_tensor(seq[start:end])
        y[-n:] = torch.as_tensor(seq[start + 1 : end + 1])
        if self.teacher_rows is not None:  # position j of the window has seen train[:start + j + 1]
            t[-n:] = torch.as_tensor(self.teacher_rows[u][start + 1 : end + 1])
        return {"input_ids": x, "labels": y, "user": torch.tensor(u), "teacher_rows": t}


class LengthBucketSampler(Sampler[int]):
    """Window indices in an order where each run of `batch_size` has similar lengths: per epoch, a
    permutation (seeded by seed and epoch) is cut into buckets of `bucket_batches` batches, each bucket
    sorted by length and cut into batches, and the batches are shuffled."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, bucket_batches: int = 50) -> None:
        self.lengths, self.batch_size, self.seed, self.bucket = np.asarray(lengths), batch_size, seed, bucket_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        size = self.batch_size * self.bucket
        batches = []
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for i in rng.permutation(len(batches)):
            yield from batches[i].tolist()


def trim_padding(batch: dict[str, torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    """Drop the leading columns that are padding in every window of the batch (positions count from the
    right and padding is never attended to, so every real position's state is unchanged)."""
    first = first_real_column(batch["input_ids"] != pad)
    return {k: (v[:, first:] if v.dim() == 2 else v) for k, v in batch.items()}


def get_dataloaders(data: RecData, cfg: Config, teacher_rows: list[np.ndarray] | None = None
                    ) -> tuple[DataLoader, DataLoader]:
    """Train windows (shuffled) and valid users (in order)."""
    train_ds = WindowDataset(data.train, data.num_items, cfg.data.max_history, teacher_rows)
    if len(train_ds) == 0:
        raise LlmkdError("data: no user has 2 or more train interactions; nothing to train on")
    users = sample_users(data, "valid", cfg.distill.valid_users, seed=0)
    users = torch.as_tensor(users[np.argsort([len(data.train[u]) for u in users], kind="stable")])  # short first
    # its own generator: the order depends on (seed, epoch) only, and starting an epoch (or resuming one)
    # draws nothing from the global RNG that dropout uses
    order = torch.Generator().manual_seed(cfg.distill.seed)
    if cfg.distill.length_buckets:
        lengths = np.array([end - start for _, start, end in train_ds.rows])
        sampler = LengthBucketSampler(lengths, cfg.distill.batch_size, cfg.distill.seed)
        train_dl = DataLoader(train_ds, batch_size=cfg.distill.batch_size, sampler=sampler,
                              drop_last=cfg.distill.drop_last)
    else:
        train_dl = DataLoader(train_ds, batch_size=cfg.distill.batch_size, shuffle=True,
                              drop_last=cfg.distill.drop_last, generator=order)
    eval_dl = DataLoader(users, batch_size=cfg.distill.eval_batch_size, shuffle=False)
    return train_dl, eval_dl
