"""KD losses: hand-computed values, masking, call shape (student, teacher, mask)."""

from __future__ import annotations

import math

import pytest
import torch

from llmkd.losses import ListwiseKLLoss


def softmax(xs: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def hand_kl(student: list[float], teacher: list[float], T: float) -> float:
    """T^2 * sum_i p_t(i) * (log p_t(i) - log p_s(i)), p = softmax(scores / T)."""
    p_s = softmax([s / T for s in student])
    p_t = softmax([t / T for t in teacher])
    return T * T * sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))


def test_hand_computed_1x3():
    student, teacher, T = [1.0, 2.0, 0.5], [3.0, 0.0, 1.0], 2.0
    # written out: p_t = softmax([1.5, 0, 0.5]), p_s = softmax([0.5, 1, 0.25])
    zt = math.exp(1.5) + math.exp(0.0) + math.exp(0.5)
    zs = math.exp(0.5) + math.exp(1.0) + math.exp(0.25)
    p_t = [math.exp(1.5) / zt, 1 / zt, math.exp(0.5) / zt]
    p_s = [math.exp(0.5) / zs, math.exp(1.0) / zs, math.exp(0.25) / zs]
    expected = 4.0 * sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    assert expected == pytest.approx(hand_kl(student, teacher, T))
    loss = ListwiseKLLoss(temperature=T)(torch.tensor([student]), torch.tensor([teacher]))
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_zero_when_equal_and_mean_over_rows():
    loss = ListwiseKLLoss(3.0)
    x = torch.randn(4, 7)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    t = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    rows = [hand_kl(s[i].tolist(), t[i].tolist(), 3.0) for i in range(2)]
    assert loss(s, t).item() == pytest.approx(sum(rows) / 2, rel=1e-5)


def test_mask_is_as_if_absent():
    student, teacher, T = [1.0, 2.0, 0.5], [3.0, 0.0, 1.0], 2.0
    s = torch.tensor([[1.0, 9.0, 2.0, 0.5], [0.3, -1.0, 2.0, 0.0]], requires_grad=True)
    t = torch.tensor([[3.0, -7.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, False, True, True], [True, True, True, True]])
    loss = ListwiseKLLoss(T)(s, t, mask)
    expected = (hand_kl(student, teacher, T) + hand_kl(s[1].tolist(), t[1].tolist(), T)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, 1] == 0  # a masked candidate gets no gradient


def test_gradient_matches_absent_candidate():
    T = 2.0
    s3 = torch.tensor([[1.0, 2.0, 0.5]], requires_grad=True)
    s4 = torch.tensor([[1.0, 2.0, 0.5, 4.0]], requires_grad=True)
    t3, t4 = torch.tensor([[3.0, 0.0, 1.0]]), torch.tensor([[3.0, 0.0, 1.0, -2.0]])
    ListwiseKLLoss(T)(s3, t3).backward()
    ListwiseKLLoss(T)(s4, t4, torch.tensor([[True, True, True, False]])).backward()
    torch.testing.assert_close(s4.grad[:, :3], s3.grad)


def test_teacher_gets_no_gradient():
    s = torch.randn(2, 4, requires_grad=True)
    t = torch.randn(2, 4, requires_grad=True)
    ListwiseKLLoss(1.5)(s, t).backward()
    assert t.grad is None and s.grad is not None
