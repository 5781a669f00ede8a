"""Distillation pieces in-process: training windows, KD targets, hard losses (the loop runs in test_end_to_end)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmkd.distill import KDTargets, WindowDataset, hard_loss, seen_before
from llmkd.teacher import kd_cuts


def test_windows_cover_every_next_item_once():
    train = [np.arange(100, 113), np.array([5]), np.array([7, 8]), np.arange(20, 25)]
    ds = WindowDataset(train, num_items=200, max_len=5)
    labels: dict[int, list[int]] = {}
    for i in range(len(ds)):
        row = ds[i]
        x, y, u = row["input_ids"], row["labels"], int(row["user"])
        assert x.shape == y.shape == row["teacher_rows"].shape == (5,)
        real = x != 200
        assert torch.equal(real, y != -100)  # a label exactly where there is an input
        assert not real[: int((~real).sum())].any()  # left padded
        assert (row["teacher_rows"] == -1).all()  # no teacher: no KD position
        labels.setdefault(u, []).extend(y[y != -100].tolist())
    for u, seq in enumerate(train):
        assert sorted(labels.get(u, [])) == sorted(seq[1:].tolist()), u


def make_cache(train, n_items=9, d=6, stride=0, seed=0):
    """A teacher cache with a random user vector at each (user, cut) of `kd_cuts`."""
    g = torch.Generator().manual_seed(seed)
    data = SimpleNamespace(train=train)
    pos_user, pos_cut = kd_cuts(data, stride)
    items = torch.nn.functional.normalize(torch.randn(n_items, d, generator=g), dim=1)
    user = torch.nn.functional.normalize(torch.randn(len(pos_user), d, generator=g), dim=1)
    arrays = {"item_emb": items, "user_pos": user.half(), "pos_user": torch.as_tensor(pos_user),
              "pos_cut": torch.as_tensor(pos_cut)}
    return SimpleNamespace(arrays=arrays, item_emb=items, folder="teacher")


@pytest.mark.parametrize("stride", [0, 1, 3])
def test_teacher_rows_point_at_the_history_each_position_has_seen(stride):
    train = [np.arange(10, 23), np.array([5]), np.array([7, 8]), np.arange(20, 25)]
    cache = make_cache(train, n_items=30, stride=stride)
    kd = KDTargets(cache, k=3, scale=20.0, device=torch.device("cpu"))
    ds = WindowDataset(train, num_items=30, max_len=5, teacher_rows=kd.rows_by_user(train))
    seen_cuts: dict[int, list[int]] = {}
    for i in range(len(ds)):
        row = ds[i]
        u, x, y, r = int(row["user"]), row["input_ids"], row["labels"], row["teacher_rows"]
        for j in torch.nonzero(r >= 0).flatten().tolist():
            cut = int(cache.arrays["pos_cut"][r[j]])
            assert int(cache.arrays["pos_user"][r[j]]) == u
            assert x[j].item() == train[u][cut - 1] and y[j].item() == train[u][cut]  # history train[:cut] -> train[cut]
            seen_cuts.setdefault(u, []).append(cut)
    for u, seq in enumerate(train):
        expected = [] if len(seq) < 2 else sorted(range(len(seq) - 1, 0, -stride)) if stride else [len(seq) - 1]
        assert sorted(seen_cuts.get(u, [])) == expected, u


def test_kd_targets_exclude_seen_items_and_add_the_positive_once():
    train = [np.arange(0, 6), np.arange(3, 9)]
    cache = make_cache(train, n_items=9, stride=1)
    kd = KDTargets(cache, k=2, scale=20.0, device=torch.device("cpu"))
    rows = torch.tensor([0, 1, 7])
    full = cache.arrays["user_pos"][rows].float() @ cache.item_emb.T * 20.0
    seen = torch.zeros(3, 9, dtype=torch.bool)
    seen[0, full[0].argmax()] = True  # the teacher's favourite is already seen in row 0
    seen[2, :8] = True  # row 2: a single unseen item, fewer than K
    in_top = int(full[1].argmax())
    positives = torch.tensor([int(full[0].argmin()), in_top, 8])
    cand, scores, mask = kd(rows, seen, positives)
    assert cand.shape == scores.shape == mask.shape == (3, 3)
    assert int(full[0].argmax()) not in cand[0, :2].tolist()
    expected0 = torch.topk(full[0].masked_fill(seen[0], float("-inf")), 2).indices
    assert cand[0, :2].tolist() == expected0.tolist() and mask[0].all()
    torch.testing.assert_close(scores[mask], full.gather(1, cand)[mask])  # exact teacher scores
    assert cand[:, -1].tolist() == positives.tolist()
    assert mask[1, -1].item() is False  # the positive is already a top-K candidate: not counted twice
    assert mask[2].tolist() == [True, False, False]  # one real unseen item; the positive (8) is it


def test_seen_before_is_causal():
    x = torch.tensor([[4, 4, 0, 2, 1], [3, 0, 1, 2, 0]])  # left-padded with num_items = 4
    at = torch.tensor([[False, True, True, False, True], [False, False, False, True, False]])
    seen = seen_before(x, at, 4)
    assert seen.shape == (4, 4)  # one row per selected position, row-major
    assert not seen[0].any()  # only padding so far
    assert seen[1].tolist() == [True, False, False, False]
    assert seen[2].tolist() == [True, True, True, False]
    assert seen[3].tolist() == [True, True, True, True]


@pytest.mark.parametrize("loss", ["full_softmax", "sampled_softmax"])
def test_hard_loss(loss):
    torch.manual_seed(0)
    n_items = 30
    states = torch.randn(4, 5, 8, requires_grad=True)
    items = torch.randn(n_items, 8, requires_grad=True)
    labels = torch.randint(0, n_items, (4, 5))
    labels[:, :2] = -100
    counts = torch.arange(1, n_items + 1, dtype=torch.float32)
    log_q = (counts / counts.sum()).log()
    cfg = SimpleNamespace(loss=loss, num_negatives=64)
    value = hard_loss(states, items, labels, cfg, log_q, generator=torch.Generator().manual_seed(0))
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert states.grad[:, :2].abs().sum() == 0  # unlabelled positions get no gradient
    if loss == "full_softmax":
        keep = labels != -100
        ref = torch.nn.functional.cross_entropy(states[keep] @ items.T, labels[keep])
        torch.testing.assert_close(value, ref)
