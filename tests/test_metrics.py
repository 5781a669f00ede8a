"""Ranking metrics against a brute-force reference: full ranking, seen items masked, ties to lower index."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmkd.data import RecData
from llmkd.evaluation.metrics import (
    MISS_RANK,
    BlockScorer,
    evaluate_retrieval,
    evaluate_scores,
    mask_seen,
    metrics_from_ranks,
    paired_bootstrap,
    popularity_scorer,
    repeated_targets,
    target_ranks,
)
from llmkd.infra.artifacts import LlmkdError

KS = (1, 3, 5, 10)


def brute_rank(scores: np.ndarray, target: int, seen=()) -> float:
    """0-based position of `target` in the catalog sorted by (-score, index), seen items removed; a
    target among the seen items (a repeated interaction) is removed with them: never ranked (inf)."""
    order = sorted((j for j in range(len(scores)) if j not in set(seen)), key=lambda j: (-scores[j], j))
    return order.index(target) if target in order else math.inf


def brute_metrics(rank: float, k: int) -> dict[str, float]:
    hit = rank < k
    return {"recall": float(hit), "hit": float(hit), "ndcg": 1 / math.log2(rank + 2) if hit else 0.0,
            "mrr": 1 / (rank + 1) if hit else 0.0}


def fresh_users(data: RecData, split: str) -> list[int]:
    """Evaluated users whose held-out item is not in their history."""
    return [int(u) for u in data.eval_users(split) if data.targets(split)[u] not in data.history(u, split)]


def random_data(seed: int = 0, n_users: int = 23, n_items: int = 17) -> RecData:
    """A small RecData; some users train only. Every 4th evaluated user's test item repeats one of its
    train items and every 5th's valid item does (repeated interactions); the other items are distinct."""
    rng = np.random.default_rng(seed)
    train, valid, test = [], np.full(n_users, -1), np.full(n_users, -1)
    for u in range(n_users):
        seq = rng.permutation(n_items)[: rng.integers(1, 9)]
        if len(seq) >= 3:
            train.append(seq[:-2])
            valid[u], test[u] = seq[-2], seq[-1]
            if u % 4 == 0:
                test[u] = rng.choice(seq[:-2])
            if u % 5 == 1:
                valid[u] = rng.choice(seq[:-2])
        else:
            train.append(seq)
    return RecData([str(u) for u in range(n_users)], [str(i) for i in range(n_items)],
                   [f"item {i}" for i in range(n_items)], train, valid, test, "fp")


def tied_scores(rng: np.random.Generator, shape) -> np.ndarray:
    """Scores from a few values, so ties are common."""
    return rng.integers(0, 4, size=shape).astype(np.float32)


def test_target_ranks_brute_force_with_ties():
    rng = np.random.default_rng(0)
    scores = tied_scores(rng, (50, 30))
    targets = rng.integers(0, 30, 50)
    ranks = target_ranks(torch.as_tensor(scores), torch.as_tensor(targets)).numpy()
    assert ranks.dtype == np.int64
    assert list(ranks) == [brute_rank(s, t) for s, t in zip(scores, targets)]


def test_target_ranks_tie_goes_to_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    assert target_ranks(scores, torch.tensor([0])).item() == 0
    assert target_ranks(scores, torch.tensor([2])).item() == 2
    assert target_ranks(scores, torch.tensor([3])).item() == 3


def test_mask_seen():
    scores = torch.zeros(3, 5)
    mask_seen(scores, [np.array([0, 4]), np.array([], dtype=np.int64), np.array([2])])
    assert torch.isinf(scores).nonzero().tolist() == [[0, 0], [0, 4], [2, 2]]


def test_metrics_hand_checked():
    m = metrics_from_ranks(np.array([0, 1, 4, 9, 10]), ks=(10, 5))
    np.testing.assert_allclose(m["ndcg@10"], [1.0, 1 / math.log2(3), 1 / math.log2(6), 1 / math.log2(11), 0.0])
    np.testing.assert_allclose(m["mrr@10"], [1.0, 0.5, 0.2, 0.1, 0.0])
    np.testing.assert_array_equal(m["recall@10"], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(m["hit@10"], m["recall@10"])
    np.testing.assert_array_equal(m["recall@5"], [1, 1, 1, 0, 0])
    np.testing.assert_allclose(m["ndcg@5"], [1.0, 0.6309297535714575, 0.38685280723454163, 0.0, 0.0])
    assert set(m) == {f"{name}@{k}" for name in ("recall", "hit", "ndcg", "mrr") for k in (10, 5)}


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("batch_size", [4, 256])
def test_evaluate_scores_brute_force(split, batch_size):
    data = random_data()
    rng = np.random.default_rng(1)
    table = tied_scores(rng, (data.num_users, data.num_items))
    calls = []

    def score_fn(users, s):
        calls.append(s)
        return torch.as_tensor(table[users])

    m = evaluate_scores(data, split, score_fn, KS, batch_size=batch_size)
    users = data.eval_users(split)
    assert set(calls) == {split} and len(m["ndcg@10"]) == len(users) > 0
    repeated = 0
    for row, u in enumerate(users):
        rank = brute_rank(table[u], data.targets(split)[u], data.history(u, split))
        repeated += rank == math.inf
        for k in KS:
            for name, value in brute_metrics(rank, k).items():
                assert m[f"{name}@{k}"][row] == pytest.approx(value), (u, name, k)
    assert repeated >= 2  # the reference met held-out items that are in the history


def test_masking_matters():
    """A seen item with the top score must not push the target down."""
    data = random_data()
    u = fresh_users(data, "test")[0]
    scores = np.zeros((data.num_users, data.num_items), np.float32)
    scores[u, data.history(u, "test")] = 10.0
    scores[u, data.test_item[u]] = 5.0
    m = evaluate_scores(data, "test", lambda users, s: torch.as_tensor(scores[users]), ks=(1,))
    assert m["ndcg@1"][list(data.eval_users("test")).index(u)] == 1.0


@pytest.mark.parametrize("split", ["valid", "test"])
def test_a_held_out_item_in_the_history_is_a_miss_at_every_k(split):
    """Repeated interaction (docs/protocol.md): the held-out item is masked like any seen item, so even the
    model's top score on it, with K as large as the catalog, is a miss."""
    data = random_data()
    users = data.eval_users(split)
    rows = [row for row, u in enumerate(users) if data.targets(split)[u] in data.history(u, split)]
    assert rows
    table = np.zeros((data.num_users, data.num_items), np.float32)
    table[users, data.targets(split)[users]] = 10.0  # every target gets the top score
    ks = (1, 10, data.num_items, 100)
    m = evaluate_scores(data, split, lambda us, s: torch.as_tensor(table[us]), ks)
    for k in ks:
        for name in ("recall", "hit", "ndcg", "mrr"):
            assert not m[f"{name}@{k}"][rows].any(), (name, k)
            others = np.setdiff1d(np.arange(len(users)), rows)
            assert (m[f"{name}@{k}"][others] == 1.0).all(), (name, k)  # the other targets rank first


def test_repeated_targets_counts_held_out_items_in_the_history():
    data = random_data()  # test items repeat a train item for users 0, 4, 8, ...; valid items for 1, 6, 11, ...
    assert repeated_targets(data, "test") == sum(int(u) % 4 == 0 for u in data.eval_users("test")) > 0
    assert repeated_targets(data, "valid") == sum(int(u) % 5 == 1 for u in data.eval_users("valid")) > 0


def test_evaluate_scores_does_not_modify_scorer_output():
    data = random_data()
    table = torch.rand(data.num_users, data.num_items)
    before = table.clone()
    evaluate_scores(data, "test", lambda users, s: table[torch.as_tensor(users)], KS)
    torch.testing.assert_close(table, before)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluate_retrieval_matches_exact(split):
    """A retriever returning the exact top-k (seen items included) gives the same metrics as full ranking."""
    data = random_data(seed=2)
    rng = np.random.default_rng(3)
    table = tied_scores(rng, (data.num_users, data.num_items))

    def retrieve(users, s, k):
        assert s == split
        assert k <= data.num_items
        return np.array([sorted(range(data.num_items), key=lambda j: (-table[u, j], j))[:k] for u in users])

    exact = evaluate_scores(data, split, lambda users, s: torch.as_tensor(table[users]), KS)
    approx = evaluate_retrieval(data, split, retrieve, KS, batch_size=5)
    for key in exact:
        np.testing.assert_allclose(approx[key], exact[key], err_msg=key)


def test_evaluate_retrieval_handles_short_lists():
    """-1 padding (FAISS's 'fewer than k') and a missing target count as a miss, not an error."""
    data = random_data(seed=4)
    users = data.eval_users("test")
    m = evaluate_retrieval(data, "test", lambda us, s, k: np.full((len(us), k), -1), ks=(5,))
    assert len(m["ndcg@5"]) == len(users) and not m["ndcg@5"].any()


def test_popularity_scorer_counts_train_only():
    data = random_data()
    fn = popularity_scorer(data)
    s = fn(np.array([0, 1]), "test")
    assert s.shape == (2, data.num_items)
    np.testing.assert_array_equal(s[0].numpy(), np.bincount(np.concatenate(data.train), minlength=data.num_items))


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    b = rng.random(500)
    a = b + 0.05 + 0.1 * rng.standard_normal(500)
    r = paired_bootstrap(a, b, n=500, seed=0)
    assert r["lo"] < r["mean"] < r["hi"]
    assert r["lo"] > 0
    assert r["mean"] == pytest.approx(float(np.mean(a - b)))
    # paired: a constant per-user shift has no spread, whatever the users' own spread (an unpaired bootstrap,
    # resampling a and b separately, would give an interval about +-0.05 wide here)
    shift = paired_bootstrap(b + 0.25, b, n=200)
    assert shift["lo"] == pytest.approx(0.25, abs=1e-9) and shift["hi"] == pytest.approx(0.25, abs=1e-9)
    # no difference: the interval straddles zero; identical seeds give identical intervals
    noise = paired_bootstrap(b + 0.1 * rng.standard_normal(500), b, n=500, seed=1)
    assert noise["lo"] < 0 < noise["hi"]
    assert paired_bootstrap(a, b, n=300, seed=7) == paired_bootstrap(a, b, n=300, seed=7)


def test_cold_start_set_metrics_by_hand():
    from llmkd.experiments.coldstart import set_metrics

    top = np.array([[3, 1, 4, 0], [2, 0, 1, 3]])
    relevant = [{1, 0}, {5}]  # user 0: hits at ranks 2 and 4; user 1: its item is not among the candidates
    m = set_metrics(top, relevant, [2, 10])
    assert m["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    ndcg0 = (1 / np.log2(3)) / (1 + 1 / np.log2(3))
    assert m["ndcg@2"] == pytest.approx(ndcg0 / 2)
    assert m["recall@10"] == pytest.approx((1.0 + 0) / 2)  # a list shorter than K counts what it has
    ndcg0_10 = (1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))
    assert m["ndcg@10"] == pytest.approx(ndcg0_10 / 2)


# ---------------------------------------------------------------- non-finite scores


def one_bad_score(data: RecData, split: str, value: float, on_target: bool) -> np.ndarray:
    """A finite random table with `value` at one eval user's target (or at an item outside its history)."""
    table = np.random.default_rng(5).random((data.num_users, data.num_items)).astype(np.float32)
    u = fresh_users(data, split)[1]
    item = int(data.targets(split)[u]) if on_target else \
        int(np.setdiff1d(np.arange(data.num_items), [*data.history(u, split), data.targets(split)[u]])[0])
    table[u, item] = value
    return table


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("value, on_target", [(float("nan"), True), (float("nan"), False), (float("inf"), True),
                                              (float("inf"), False), (float("-inf"), True)])
def test_non_finite_scores_stop_evaluation_naming_system_and_split(split, value, on_target):
    """A NaN model would rank its target first (no score compares greater than NaN) and score NDCG 1.0;
    NaN anywhere, +inf anywhere and a -inf target (not masked as seen) are errors naming system and split."""
    data = random_data()
    table = one_bad_score(data, split, value, on_target)
    with pytest.raises(LlmkdError, match=rf"^nan_model: non-finite scores on {split}\b"):
        evaluate_scores(data, split, lambda users, s: torch.as_tensor(table[users]), KS, name="nan_model")


def test_an_all_nan_model_raises_instead_of_scoring_perfectly():
    data = random_data()
    with pytest.raises(LlmkdError, match="scores: non-finite scores on test"):  # the generic name by default
        evaluate_scores(data, "test", lambda users, s: torch.full((len(users), data.num_items), float("nan")), KS)


def test_minus_inf_on_a_non_target_item_is_allowed():
    """-inf means 'never recommend' (what `mask_seen` writes): allowed anywhere but on an unmasked target."""
    data = random_data()
    table = one_bad_score(data, "test", float("-inf"), on_target=False)
    m = evaluate_scores(data, "test", lambda users, s: torch.as_tensor(table[users]), KS)
    assert np.isfinite(m["ndcg@10"]).all()


class TableScorer(BlockScorer):
    """A `BlockScorer` over a fixed (n_users, n_items) table, recording the widest block it served."""

    def __init__(self, table: np.ndarray) -> None:
        self.table, self.num_items, self.widest = torch.as_tensor(table), table.shape[1], 0

    def prepare(self, users, split):
        return torch.as_tensor(users)

    def block(self, users, lo, hi):
        self.widest = max(self.widest, hi - lo)
        return self.table[users, lo:hi].clone()

    def pairs(self, users, items):
        return self.table[users, items]


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("item_block", [1, 4, 5, 16, 17, 64])
def test_blocked_evaluation_equals_full_ranking(split, item_block):
    """Items read in blocks smaller than the catalog (histories straddling blocks, tied scores, targets
    repeated from the history) rank every target exactly as the brute-force full ranking does, and no
    block is wider than `item_block`."""
    data = random_data(n_users=40)
    table = tied_scores(np.random.default_rng(7), (data.num_users, data.num_items))
    users = data.eval_users(split)
    straddle = [u for u in users if len({int(i) // item_block for i in data.history(u, split)}) > 1]
    assert item_block >= data.num_items or straddle
    scorer = TableScorer(table)
    m = evaluate_scores(data, split, scorer, KS, batch_size=7, item_block=item_block)
    assert scorer.widest == min(item_block, data.num_items)
    full = evaluate_scores(data, split, lambda us, s: torch.as_tensor(table[us]), KS)
    for row, u in enumerate(users):
        rank = brute_rank(table[u], data.targets(split)[u], data.history(u, split))
        for k in KS:
            for name, value in brute_metrics(rank, k).items():
                assert m[f"{name}@{k}"][row] == pytest.approx(value), (u, name, k)
    for key in full:
        np.testing.assert_array_equal(m[key], full[key], err_msg=key)


@pytest.mark.parametrize("item_block", [6, 50])
def test_blocked_ranks_are_exact_beyond_the_top_k(item_block):
    """Ranks themselves (not only metrics at small K) match `target_ranks` of the whole masked row, tied scores
    included, in blocks and in one block."""
    from llmkd.evaluation.metrics import blocked_ranks

    rng = np.random.default_rng(3)
    n_items, B = 50, 9
    table = torch.as_tensor(tied_scores(rng, (B, n_items)))
    targets = torch.as_tensor(rng.integers(0, n_items, B))
    hists = [rng.choice(n_items, size=int(s), replace=False) for s in rng.integers(0, 20, B)]
    expected = target_ranks(mask_seen(table.clone(), hists), targets)
    ranks, bad = blocked_ranks(lambda lo, hi: table[:, lo:hi].clone(), n_items, item_block, targets, hists,
                               lambda: table[torch.arange(B), targets])
    assert torch.equal(ranks, expected) and not bad.any()
    assert (expected > 10).any() and (expected == MISS_RANK).any()


@pytest.mark.parametrize("value, on_target", [(float("nan"), False), (float("inf"), False), (float("-inf"), True),
                                              (float("nan"), True)])
def test_blocked_evaluation_stops_on_non_finite_scores_in_any_block(value, on_target):
    data = random_data()
    table = one_bad_score(data, "test", value, on_target)
    with pytest.raises(LlmkdError, match=r"^blocky: non-finite scores on test\b"):
        evaluate_scores(data, "test", TableScorer(table), KS, item_block=3, name="blocky")


def test_dot_scorer_blocks_rank_like_one_block():
    """A two-tower scorer (random float vectors) ranks the same read in 4-item blocks as in one block."""
    from llmkd.evaluation.metrics import DotScorer

    data = random_data(n_users=40)
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(data.num_users, 8, generator=g), torch.randn(data.num_items, 8, generator=g)
    scorer = DotScorer(lambda us, s: users[torch.as_tensor(us)], items, torch.device("cpu"))
    one = evaluate_scores(data, "test", scorer, (1, 5, 10), item_block=data.num_items)
    blocks = evaluate_scores(data, "test", scorer, (1, 5, 10), item_block=4)
    for key in one:
        np.testing.assert_array_equal(blocks[key], one[key], err_msg=key)
