"""Offline retrieval evaluation (docs/protocol.md): full ranking, seen items masked, one held-out item.

Ranking: items sorted by descending score, ties broken by lower item index (a stable sort), so every
system -- including popularity, which has many ties -- is ranked deterministically. A held-out item
that is also in the user's history (a repeated interaction) is masked like any seen item and is a
miss at every K (`MISS_RANK`). Metrics per user: HitRate@K = Recall@K (one held-out item),
NDCG@K = 1 / log2(rank + 2), MRR@K = 1 / (rank + 1), each zero when rank >= K. A `BlockScorer` (the two-tower systems: `DotScorer`) is
read `item_block` items at a time, so memory is bounded by `batch_size x item_block` scores whatever the
catalog size, on the GPU when there is one; the target's rank is counted block by block, exactly the
full ranking's. Scores must be finite: NaN
anywhere, +inf anywhere or -inf on a target the history does not mask stop evaluation (`LlmkdError`),
since a NaN target compares greater than nothing and would rank first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from llmkd.data import RecData
from llmkd.infra.artifacts import LlmkdError

ScoreFn = Callable[[np.ndarray, str], torch.Tensor]
"""(users (B,) int64, split) -> scores (B, n_items) float32 over the whole catalog."""

MISS_RANK = int(np.iinfo(np.int64).max)
"""The rank of a held-out item masked as seen (score -inf after `mask_seen`): a miss at every K."""

PROTOCOL = {
    "ranking": "full catalog, no sampled negatives; ties in score to the lower item index",
    "seen_items": "masked (score -inf): valid masks the train items, test the train items and the valid item",
    "repeated_interactions": "a held-out item that is also in the user's history is masked like any seen "
                             "item, so it counts as a miss at every K (a choice of the protocol)",
    "metrics": "one held-out item per user; HitRate@K = Recall@K, NDCG@K = 1 / log2(rank + 2), "
               "MRR@K = 1 / (rank + 1), each 0 when rank >= K; means over the evaluated users",
    "non_finite_scores": "an error (NaN or +inf anywhere, -inf on an unmasked held-out item)",
    "reference": "docs/protocol.md",
}
"""The evaluation protocol in words, written next to every metrics file (`eval/protocol.json`)."""


def mask_seen(scores: torch.Tensor, histories: Sequence[np.ndarray]) -> torch.Tensor:
    """Set scores of each row's history items to -inf, in place; (B, n) float32."""
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories) if len(histories) else np.zeros(0, dtype=np.int64)
    scores[torch.as_tensor(rows), torch.as_tensor(cols, dtype=torch.long)] = float("-inf")
    return scores


def nonfinite_rows(scores: torch.Tensor, targets: torch.Tensor, histories: Sequence[np.ndarray]) -> torch.Tensor:
    """(B, n) raw scores (before `mask_seen`), (B,) targets -> (B,) bool: a NaN or +inf anywhere in the
    row, or -inf on a target outside the row's history (-inf elsewhere means 'never', like a mask)."""
    s_t = scores.gather(1, targets[:, None].to(scores.device))[:, 0].cpu()
    in_hist = torch.tensor([bool(np.isin(t, h)) for t, h in zip(targets.tolist(), histories)], dtype=torch.bool)
    return (torch.isnan(scores).any(1) | torch.isposinf(scores).any(1)).cpu() | (torch.isneginf(s_t) & ~in_hist)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target under descending score, ties to the lower index, `MISS_RANK` for a
    target scored -inf (masked as seen); (B,) int64."""
    assert scores.dim() == 2 and targets.shape == (scores.shape[0],)
    s_t = scores.gather(1, targets[:, None])
    idx = torch.arange(scores.shape[1], device=scores.device)
    better = (scores > s_t) | ((scores == s_t) & (idx[None, :] < targets[:, None]))
    return better.sum(1).masked_fill(torch.isneginf(s_t[:, 0]), MISS_RANK)


def repeated_targets(data: RecData, split: str, users: np.ndarray | None = None) -> int:
    """Evaluated users of `split` (or `users`) whose held-out item is already in their history (each a miss)."""
    users = data.eval_users(split) if users is None else users
    return sum(int(np.isin(data.targets(split)[u], data.history(u, split))) for u in users)


def sample_users(data: RecData, split: str, n: int, seed: int) -> np.ndarray:
    """`split`'s evaluated users, or a fixed random sample of n of them (sorted) when 0 < n < their number."""
    users = data.eval_users(split)
    if n <= 0 or n >= len(users):
        return users
    return np.sort(np.random.default_rng(seed).choice(users, n, replace=False))


def ranks_from_lists(ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank of each target in its retrieved list (B, k); k where absent; (B,) int64."""
    hit = ids == targets[:, None]
    return np.where(hit.any(1), hit.argmax(1), ids.shape[1])


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-user metric arrays {'ndcg@10': (n,) float64, ...} from 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = hit.astype(np.float64)
        out[f"hit@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 2), 0.0)
        out[f"mrr@{k}"] = np.where(hit, 1.0 / (ranks + 1), 0.0)
    return out


def summarize(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean of each per-user metric, plus the number of users."""
    out = {name: float(np.mean(v)) for name, v in per_user.items()}
    out["users"] = int(len(next(iter(per_user.values()))))
    return out


class BlockScorer:
    """A scorer read one block of items at a time, so memory stays (batch, item_block) whatever the catalog.

    `prepare(users, split)` -> a per-batch state (e.g. user vectors); `block(state, lo, hi)` -> (B, hi - lo)
    float32 scores of items lo..hi-1 as a fresh tensor (the caller overwrites it); `pairs(state, items)`
    -> (B,) float32 score of row i with item items[i]."""

    num_items: int
    device: torch.device = torch.device("cpu")

    def prepare(self, users: np.ndarray, split: str):
        raise NotImplementedError

    def block(self, state, lo: int, hi: int) -> torch.Tensor:
        raise NotImplementedError

    def pairs(self, state, items: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, users: np.ndarray, split: str) -> torch.Tensor:
        """Full-catalog scores (B, n_items): a `ScoreFn` for callers that want whole rows."""
        return self.block(self.prepare(users, split), 0, self.num_items)


class DotScorer(BlockScorer):
    """score = user vector . item vector: `user_fn(users, split)` -> (B, d), `items` (n_items, d); scored
    on `device` (default: the GPU when there is one)."""

    def __init__(self, user_fn: Callable[[np.ndarray, str], torch.Tensor], items: torch.Tensor,
                 device: torch.device | None = None) -> None:
        self.device = device or default_device()
        self.user_fn, self.items = user_fn, items.detach().float().to(self.device)
        self.num_items = len(items)

    def prepare(self, users: np.ndarray, split: str) -> torch.Tensor:
        return self.user_fn(users, split).detach().float().to(self.device)  # (B, d)

    def block(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return state @ self.items[lo:hi].T  # (B, hi - lo)

    def pairs(self, state: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (state * self.items[items.to(self.device)]).sum(-1)  # (B,)


def default_device() -> torch.device:
    """Where evaluation scores: the GPU when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def in_history(targets: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
    """(B,) targets, B histories -> (B,) bool: the target is among the row's history items."""
    lens = np.array([len(h) for h in histories], dtype=np.int64)
    rows = np.repeat(np.arange(len(histories), dtype=np.int64), lens)
    cols = np.concatenate(histories).astype(np.int64) if len(histories) else np.zeros(0, dtype=np.int64)
    n = int(max(cols.max(initial=0), np.max(targets, initial=0))) + 1
    return np.isin(np.arange(len(targets)) * n + np.asarray(targets, dtype=np.int64), rows * n + cols)


def blocked_ranks(score_block: Callable[[int, int], torch.Tensor], n_items: int, item_block: int,
                  targets: torch.Tensor, histories: Sequence[np.ndarray],
                  target_scores: Callable[[], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`target_ranks` and `nonfinite_rows` of raw scores read `item_block` items at a time
    (`score_block(lo, hi)` -> fresh (B, hi - lo) float32, overwritten here), seen items masked in place:
    ranks (B,) int64, bad (B,) bool. The target's score comes from its block when one block holds the
    catalog, else from `target_scores()` (B,); the target itself is never counted as better than itself."""
    device = targets.device
    B = len(targets)
    lens = torch.as_tensor([len(h) for h in histories], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(B), lens).to(device)
    cols = torch.as_tensor(np.concatenate(histories) if B else np.zeros(0), dtype=torch.long).to(device)
    seen_target = torch.as_tensor(in_history(targets.cpu().numpy(), histories), device=device)
    single = item_block >= n_items
    s_t = None if single else target_scores().float().to(device)  # (B,)
    better = torch.zeros(B, dtype=torch.long, device=device)
    bad = torch.zeros(B, dtype=torch.bool, device=device)
    everyone = torch.arange(B, device=device)
    for lo in range(0, n_items, item_block):
        hi = min(n_items, lo + item_block)
        s = score_block(lo, hi)  # (B, b)
        assert s.shape == (B, hi - lo), (s.shape, B, lo, hi)
        bad |= ~(s.amax(1) < float("inf"))  # NaN propagates through amax, +inf is not below inf: one pass
        if single:
            s_t = s.gather(1, targets[:, None])[:, 0].clone()
        here = (cols >= lo) & (cols < hi)
        s[rows[here], cols[here] - lo] = float("-inf")
        mine = (targets >= lo) & (targets < hi)
        s[everyone[mine], targets[mine] - lo] = float("-inf")  # the target is not better than itself
        flags = s > s_t[:, None]
        better += torch.count_nonzero(flags, dim=1)  # no (B, b) int64 copy, as .sum(1) of bools makes
        torch.eq(s, s_t[:, None], out=flags)
        if flags.any():  # exact ties (rare outside degenerate scores) go to the lower index
            idx = torch.arange(lo, hi, device=device)
            better += torch.count_nonzero(flags & (idx[None, :] < targets[:, None]), dim=1)
    bad |= torch.isnan(s_t) | torch.isposinf(s_t) | (torch.isneginf(s_t) & ~seen_target)
    return better.masked_fill(seen_target | torch.isneginf(s_t), MISS_RANK), bad


def evaluate_scores(data: RecData, split: str, score_fn: ScoreFn | BlockScorer, ks: Sequence[int] = (10, 20, 50),
                    batch_size: int = 256, desc: str | None = None, name: str = "scores",
                    item_block: int = 65536, users: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-user metrics of a full-catalog scorer on `split` ('valid' or 'test') for `users` (default: every
    evaluated user); `name` (the system) labels the error raised for non-finite scores. A `BlockScorer` is
    read `item_block` items at a time (memory batch_size x item_block); a plain `ScoreFn` gives whole
    rows, copied once."""
    users = data.eval_users(split) if users is None else users
    targets = data.targets(split)
    blocked = isinstance(score_fn, BlockScorer)
    device = score_fn.device if blocked else torch.device("cpu")
    ranks = []
    for start in tqdm(range(0, len(users), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = users[start : start + batch_size]
        hists, tgt = [data.history(u, split) for u in batch], torch.as_tensor(targets[batch], device=device)
        if blocked:
            state = score_fn.prepare(batch, split)
            rank, bad = blocked_ranks(lambda lo, hi: score_fn.block(state, lo, hi).float(), data.num_items,
                                      item_block, tgt, hists, lambda: score_fn.pairs(state, tgt))
        else:
            scores = score_fn(batch, split).float().clone()
            assert scores.shape == (len(batch), data.num_items), scores.shape
            rank, bad = blocked_ranks(lambda lo, hi: scores, data.num_items, data.num_items, tgt, hists)
        if bad.any():
            first = data.user_ids[int(batch[int(bad.nonzero()[0, 0])])]
            raise LlmkdError(f"{name}: non-finite scores on {split} (NaN, +inf, or -inf on an unseen target) for "
                             f"{int(bad.sum())} user(s) of a batch, first user_id {first}; evaluation stopped")
        ranks.append(rank.cpu().numpy())
    return metrics_from_ranks(np.concatenate(ranks), ks)


def evaluate_retrieval(data: RecData, split: str, retrieve: Callable[[np.ndarray, str, int], np.ndarray],
                       ks: Sequence[int] = (10, 20, 50), batch_size: int = 256,
                       users: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-user metrics of a top-k retriever (e.g. a FAISS index) for `users` (default: every evaluated
    user): over-fetch, drop seen items, rank."""
    users = data.eval_users(split) if users is None else users
    targets, kmax = data.targets(split), max(ks)
    ranks = []
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        hists = [data.history(u, split) for u in batch]
        k = min(data.num_items, kmax + max(len(h) for h in hists))
        ids = retrieve(batch, split, k)
        lists = np.full((len(batch), kmax), -1, dtype=np.int64)
        for row, (found, hist) in enumerate(zip(ids, hists)):
            keep = found[(found >= 0) & ~np.isin(found, hist)][:kmax]
            lists[row, : len(keep)] = keep
        ranks.append(ranks_from_lists(lists, targets[batch]))
    return metrics_from_ranks(np.concatenate(ranks), ks)


def popularity_scorer(data: RecData, device: torch.device | None = None) -> DotScorer:
    """Scores every item by its number of train interactions (a 1-d dot product: 1 x count)."""
    counts = torch.as_tensor(data.item_counts(), dtype=torch.float32)[:, None]  # (N, 1)
    return DotScorer(lambda users, split: torch.ones(len(users), 1), counts, device)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of per-user `a - b` and its 95% bootstrap interval (users resampled with replacement)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n)])
    return {"mean": float(diff.mean()), "lo": float(np.percentile(means, 2.5)), "hi": float(np.percentile(means, 97.5))}
