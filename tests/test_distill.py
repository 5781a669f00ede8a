"""Distillation pieces in-process: training windows, KD targets, hard losses (the loop runs in test_end_to_end)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmkd.distill import KDTargets, WindowDataset, hard_loss


def test_windows_cover_every_next_item_once():
    train = [np.arange(100, 113), np.array([5]), np.array([7, 8]), np.arange(20, 25)]
    ds = WindowDataset(train, num_items=200, max_len=5)
    labels: dict[int, list[int]] = {}
    kd_rows = []
    for i in range(len(ds)):
        row = ds[i]
        x, y, u = row["input_ids"], row["labels"], int(row["user"])
        assert x.shape == y.shape == (5,)
        real = x != 200
        assert torch.equal(real, y != -100)  # a label exactly where there is an input
        assert not real[: int((~real).sum())].any()  # left padded
        labels.setdefault(u, []).extend(y[y != -100].tolist())
        if row["kd"]:
            kd_rows.append(u)
            assert y[-1].item() == train[u][-1]  # the KD positive: the last train item
            assert x[-1].item() == train[u][-2]  # after history train[:-1]
    for u, seq in enumerate(train):
        assert sorted(labels.get(u, [])) == sorted(seq[1:].tolist()), u
    assert sorted(kd_rows) == [0, 2, 3]  # one newest window per user with >= 2 train items


def make_cache(n_users=4, n_items=9, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.nn.functional.normalize(torch.randn(n_items, d, generator=g), dim=1)
    user = torch.nn.functional.normalize(torch.randn(n_users, d, generator=g), dim=1)
    top = torch.topk(user @ items.T, k, dim=1)
    arrays = {"item_emb": items, "user_kd": user, "topk_ids_kd": top.indices, "topk_scores_kd": top.values}
    return SimpleNamespace(arrays=arrays, item_emb=items)


def test_kd_targets():
    cache = make_cache()
    kd = KDTargets(cache, k=2, scale=20.0, device=torch.device("cpu"))
    users = torch.tensor([0, 1, 3])
    in_topk = cache.arrays["topk_ids_kd"][1, 0]
    positives = torch.tensor([8, int(in_topk), 0])
    cand, scores, mask = kd(users, positives)
    assert cand.shape == scores.shape == mask.shape == (3, 3)
    torch.testing.assert_close(cand[:, :2], cache.arrays["topk_ids_kd"][users, :2])
    assert cand[:, -1].tolist() == positives.tolist()
    full = cache.arrays["user_kd"][users] @ cache.item_emb.T * 20.0
    torch.testing.assert_close(scores, full.gather(1, cand))  # cached and exact scores agree
    assert mask[:, :2].all()
    assert mask[1, -1].item() is False  # the positive is already a top-K candidate: not counted twice
    expected_row0 = 8 not in cache.arrays["topk_ids_kd"][0, :2].tolist()
    assert mask[0, -1].item() is expected_row0


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
