"""Property tests (hypothesis): the leave-last-out split and the ranking metrics against brute force.

Split: random interaction tables with few users, items and timestamp values (so ties, repeats and
negative timestamps are common) are split by `llmkd.data.split_leave_last_out` and checked against
Python's stable `sorted` and against the protocol's invariants. Metrics: random score matrices with
ties and masked (seen) items are ranked by `llmkd.evaluation.metrics` and checked against a ranking built by
sorting every row, from which NDCG / Recall / HitRate / MRR @K are computed by their definitions.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from llmkd.data import split_leave_last_out
from llmkd.evaluation.metrics import mask_seen, metrics_from_ranks, ranks_from_lists, target_ranks

SETTINGS = settings(max_examples=50, deadline=None)
N_ITEMS = 8

rows = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, N_ITEMS - 1), st.integers(-3, 3)),  # user, item, timestamp
    min_size=1, max_size=40,
)


def table(raw: list[tuple[int, int, int]]) -> pd.DataFrame:
    """Rows as the data stage holds them: string ids, float64 timestamps, file order kept."""
    return pd.DataFrame({"user_id": [f"u{u}" for u, _, _ in raw], "item_id": [str(i) for _, i, _ in raw],
                         "timestamp": np.array([t for _, _, t in raw], dtype=np.float64)})


def split(raw: list[tuple[int, int, int]]) -> dict[str, tuple[list[int], int | None, int | None]]:
    """{user: (train items, valid item or None, test item or None)} from the library."""
    user_ids, train, valid, test = split_leave_last_out(table(raw), [str(i) for i in range(N_ITEMS)], "t.csv")
    return {u: ([int(i) for i in train[k]], int(valid[k]) if valid[k] >= 0 else None,
                int(test[k]) if test[k] >= 0 else None) for k, u in enumerate(user_ids)}


@SETTINGS
@given(rows)
def test_split_matches_stable_sort_reference(raw):
    """Per user: rows in file order, Python's stable sort by timestamp; last -> test, second last -> valid."""
    seqs: dict[str, list[tuple[int, int]]] = {}
    for u, i, t in raw:
        seqs.setdefault(f"u{u}", []).append((t, i))
    expected = {}
    for u, seq in seqs.items():
        items = [i for _, i in sorted(seq, key=lambda r: r[0])]
        expected[u] = (items[:-2], items[-2], items[-1]) if len(items) >= 3 else (items, None, None)
    assert split(raw) == expected


def first_of_each_pair(raw: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Drop repeated (user, item) rows, keeping the first, so an item identifies its row within a user."""
    pairs: set[tuple[int, int]] = set()
    return [r for r in raw if not (r[:2] in pairs or pairs.add(r[:2]))]


@SETTINGS
@given(rows.map(first_of_each_pair))
def test_split_invariants(raw):
    """With each (user, item) once, every held-out item is traced back to its row and checked:

    - conservation: a user's train + valid + test are exactly its rows;
    - users with < 3 interactions have no valid / test item, the others have both;
    - chronology: train timestamps are sorted, and max(train) <= valid <= test;
    - no leak: no train row comes after the valid or test row in (timestamp, file position) order,
      so neither held-out item appears in its own user's train at a later time position;
    - ties keep file order: equal timestamps appear in the order of their rows in the file.
    """
    where = {(f"u{u}", i): (t, pos) for pos, (u, i, t) in enumerate(raw)}  # (timestamp, file position)
    counts: dict[str, int] = {}
    for u, _, _ in raw:
        counts[f"u{u}"] = counts.get(f"u{u}", 0) + 1
    result = split(raw)
    assert set(result) == set(counts)
    for u, (train, valid, test) in result.items():
        held = [x for x in (valid, test) if x is not None]
        assert sorted(train + held) == sorted(i for (uu, i) in where if uu == u)
        if counts[u] < 3:
            assert valid is None and test is None and len(train) == counts[u]
            continue
        assert valid is not None and test is not None
        keys = [where[u, i] for i in [*train, valid, test]]  # (timestamp, position) in split order
        assert keys == sorted(keys)  # chronology, and ties in file order
        assert valid not in train and test not in train
        assert max((where[u, i][0] for i in train), default=-math.inf) <= where[u, valid][0] <= where[u, test][0]


# ---------------------------------------------------------------- metrics


@st.composite
def ranking_problems(draw):
    """Scores (B, n) float32 with ties, a seen-item mask (never the target) and targets (B,)."""
    B, n = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    scores = draw(arrays(np.float32, (B, n), elements=st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0])))
    seen = draw(arrays(np.bool_, (B, n)))
    targets = draw(arrays(np.int64, (B,), elements=st.integers(0, n - 1)))
    seen[np.arange(B), targets] = False
    return scores, seen, targets


def brute_force_order(row: np.ndarray, seen: np.ndarray) -> list[int]:
    """Unseen items by descending score, ties to the lower index (docs/protocol.md); seen items dropped."""
    return sorted((i for i in range(len(row)) if not seen[i]), key=lambda i: (-float(row[i]), i))


def metric_by_definition(name: str, ranked: list[int], target: int, k: int) -> float:
    """NDCG / Recall / HitRate / MRR @k of one user with one relevant item, from a ranked list."""
    top = ranked[:k]
    rel = [1.0 if i == target else 0.0 for i in top]
    if name == "ndcg":
        dcg = sum(r / math.log2(p + 2) for p, r in enumerate(rel))
        return dcg / 1.0  # ideal DCG: the one relevant item at position 0
    if name == "recall":
        return sum(rel) / 1.0  # relevant items retrieved / relevant items
    if name == "hit":
        return float(any(rel))
    return next((1.0 / (p + 1) for p, r in enumerate(rel) if r), 0.0)  # mrr


@SETTINGS
@given(ranking_problems(), st.lists(st.integers(1, 15), min_size=1, max_size=3, unique=True))
def test_metrics_match_brute_force(problem, ks):
    scores, seen, targets = problem
    s = mask_seen(torch.as_tensor(scores).clone(), [np.flatnonzero(m) for m in seen])
    ranks = target_ranks(s, torch.as_tensor(targets)).numpy()
    orders = [brute_force_order(scores[b], seen[b]) for b in range(len(targets))]
    assert ranks.tolist() == [o.index(t) for o, t in zip(orders, targets)]
    got = metrics_from_ranks(ranks, ks)
    assert set(got) == {f"{m}@{k}" for m in ("ndcg", "recall", "hit", "mrr") for k in ks}
    for k in ks:
        for m in ("ndcg", "recall", "hit", "mrr"):
            want = [metric_by_definition(m, o, t, k) for o, t in zip(orders, targets)]
            np.testing.assert_allclose(got[f"{m}@{k}"], want, rtol=0, atol=1e-12, err_msg=f"{m}@{k}")


@SETTINGS
@given(ranking_problems(), st.integers(1, 12))
def test_retrieved_lists_give_the_same_metrics(problem, k):
    """Top-k lists (what a FAISS search returns, seen items dropped) give the exact metrics for K <= k."""
    scores, seen, targets = problem
    orders = [brute_force_order(scores[b], seen[b]) for b in range(len(targets))]
    lists = np.full((len(targets), k), -1, dtype=np.int64)
    for b, o in enumerate(orders):
        lists[b, : min(k, len(o))] = o[:k]
    exact = np.array([o.index(t) for o, t in zip(orders, targets)])
    from_lists = ranks_from_lists(lists, targets)
    assert from_lists.tolist() == np.minimum(exact, k).tolist()
    ks = list(range(1, k + 1))
    a, b = metrics_from_ranks(from_lists, ks), metrics_from_ranks(exact, ks)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
