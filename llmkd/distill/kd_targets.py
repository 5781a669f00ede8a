"""The teacher's KD targets for score distillation (`distill.alpha` > 0): at each position the teacher encoded,
its top-K unseen items by its own score plus the positive, found once per run by a FAISS search over its item
vectors (`KDTargets`); the user and item vectors the alignment terms read. Used by `llmkd.distill`."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from llmkd.index import build_index
from llmkd.infra.config import IndexConfig
from llmkd.infra.errors import LlmkdError
from llmkd.teacher import TeacherCache


class KDTargets:
    """The teacher's candidates at the positions it encoded (`teacher.position_stride`): its top-K items
    by its own score (excluding the items already seen there), plus the positive with its exact score.

    Teacher row r is the history train[pos_user[r]][:pos_cut[r]]; `seen(rows)` masks all of it, not just
    the student's window of `data.max_history` items (an item consumed before the window is seen too).
    The candidates depend on the teacher alone, so they are found once for every row when training
    starts: a FAISS inner-product search over the teacher's item vectors (`search` 'flat' = exact, 'ivf'
    = approximate with `nprobe` lists visited), never a rows x catalog score matrix.
    """

    def __init__(self, teacher: TeacherCache, train: list[np.ndarray], k: int, scale: float,
                 device: torch.device, search: str = "flat", nprobe: int = 32) -> None:
        missing = {"pos_user", "pos_cut", "user_pos"} - set(teacher.arrays)
        if missing:
            raise LlmkdError(f"{teacher.folder}: teacher cache lacks {sorted(missing)}; rebuild it (build_teacher.py --force)")
        self.pos_user, self.pos_cut = teacher.arrays["pos_user"].numpy(), teacher.arrays["pos_cut"].numpy()
        lengths = np.array([len(seq) for seq in train], dtype=np.int64)
        if len(self.pos_user) and ((self.pos_user >= len(train)).any() or (self.pos_cut > lengths[self.pos_user]).any()):
            raise LlmkdError(f"{teacher.folder}: teacher positions (pos_user, pos_cut) do not fit the data's train "
                             "sequences; rebuild it (build_teacher.py --force)")
        self.user = teacher.arrays["user_pos"].to(device)  # (M, d_t) as cached (float16): `user_at` widens rows
        self.items = teacher.item_emb.float().to(device)  # (N, d_t)
        self.k, self.scale, self.search, self.nprobe = min(k, len(self.items)), scale, search, nprobe
        # row r's history is the slice flat[prefix_start[r] : prefix_start[r] + pos_cut[r]] of all train sequences
        self.flat_np = np.concatenate(train).astype(np.int64) if len(train) else np.zeros(0, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.start_np, self.len_np = starts[self.pos_user], self.pos_cut.astype(np.int64)  # (M,), (M,)
        self.flat = torch.as_tensor(self.flat_np, device=device)  # (sum of lengths,) int64
        self.prefix_start = torch.as_tensor(self.start_np, device=device)  # (M,)
        self.prefix_len = torch.as_tensor(self.len_np, device=device)  # (M,)
        self.top_ids, self.top_scores = self.rank_candidates()

    def user_at(self, rows: torch.Tensor) -> torch.Tensor:
        """(P,) teacher rows -> their user vectors (P, d_t) float32."""
        return self.user[rows].float()

    def history_keys(self, rows: np.ndarray) -> np.ndarray:
        """(C,) teacher rows -> (S,) int64 keys i * N + item of every item in row rows[i]'s history."""
        lens = self.len_np[rows]
        which = np.repeat(np.arange(len(rows), dtype=np.int64), lens)
        offset = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        return which * len(self.items) + self.flat_np[np.repeat(self.start_np[rows], lens) + offset]

    @torch.no_grad()
    def rank_candidates(self, chunk: int = 4096, budget: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's top-K unseen items by teacher score: ids (M, K) int32, scores (M, K) float32
        (-inf, id 0, where fewer than K unseen items were found). Rows are searched in order of history
        length, each chunk fetching K + its longest history (so K unseen remain after masking) and at most
        `budget` results at once; memory stays chunk x (K + history), whatever the catalog size."""
        m, n = len(self.len_np), len(self.items)
        index = build_index(self.items.cpu().numpy(), IndexConfig(type=self.search, ivf_nprobe=self.nprobe))
        ids = np.zeros((m, self.k), dtype=np.int32)
        scores = np.full((m, self.k), float("-inf"), dtype=np.float32)
        order = np.argsort(self.len_np, kind="stable")
        bar = tqdm(total=m, desc=f"KD candidates ({self.search})", unit="row", disable=m <= chunk, leave=False)
        start = 0
        while start < m:
            width = self.k + int(self.len_np[order[min(m, start + chunk) - 1]])
            stop = min(m, start + max(1, min(chunk, budget // width)))
            rows = order[start:stop]
            width = min(n, self.k + int(self.len_np[rows[-1]]))
            D, I = index.search(np.ascontiguousarray(self.user[torch.as_tensor(rows)].float().cpu().numpy()), width)
            found = np.arange(len(rows), dtype=np.int64)[:, None] * n + I  # (C, width) keys like history_keys
            keep = (I >= 0) & ~np.isin(found, self.history_keys(rows))
            keep &= np.cumsum(keep, 1) <= self.k
            col = np.argsort(~keep, axis=1, kind="stable")[:, : self.k]  # the kept results first, in rank order
            real = np.take_along_axis(keep, col, 1)
            ids[rows] = np.where(real, np.take_along_axis(I, col, 1), 0)
            scores[rows] = np.where(real, np.take_along_axis(D, col, 1) * self.scale, float("-inf"))
            bar.update(len(rows))
            start = stop
        bar.close()
        device = self.items.device
        return torch.as_tensor(ids, device=device), torch.as_tensor(scores, device=device)

    def seen(self, rows: torch.Tensor) -> torch.Tensor:
        """(P,) teacher rows -> (P, N) bool: every item of row r's history train[u][:cut], whatever the window."""
        device = self.flat.device
        rows = rows.to(device)
        lens = self.prefix_len[rows]  # (P,)
        total = int(lens.sum())
        which = torch.repeat_interleave(torch.arange(len(rows), device=device), lens)  # (S,) row of each history item
        first = torch.repeat_interleave(lens.cumsum(0) - lens, lens)  # (S,) where that row's items begin
        at = torch.repeat_interleave(self.prefix_start[rows], lens) + torch.arange(total, device=device) - first
        seen = torch.zeros(len(rows), len(self.items), dtype=torch.bool, device=device)
        seen[which, self.flat[at]] = True
        return seen

    def rows_by_user(self, train: list[np.ndarray]) -> list[np.ndarray]:
        """Per user, (len + 1,) int64: the row of the teacher vector for history train[:cut], -1 = none."""
        if not train:
            return []
        sizes = np.array([len(seq) + 1 for seq in train], dtype=np.int64)
        ends = np.cumsum(sizes)
        flat = np.full(int(ends[-1]), -1, dtype=np.int64)
        flat[ends[self.pos_user] - sizes[self.pos_user] + self.pos_cut] = np.arange(len(self.pos_user))
        return np.split(flat, ends[:-1])

    def __call__(self, rows: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(P,) teacher rows, (P,) positives -> candidates, teacher scores, mask, each (P, K+1)."""
        top_ids, top_scores = self.top_ids[rows].long(), self.top_scores[rows]
        real = torch.isfinite(top_scores)  # False where fewer than K items are unseen
        positive_scores = (self.user_at(rows) * self.items[positives]).sum(-1, keepdim=True) * self.scale  # (P, 1)
        cand = torch.cat([top_ids, positives[:, None]], 1)
        scores = torch.cat([top_scores.masked_fill(~real, 0.0), positive_scores], 1)
        mask = torch.cat([real, ~((top_ids == positives[:, None]) & real).any(1, keepdim=True)], 1)  # positive once
        return cand, scores, mask
