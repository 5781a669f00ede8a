"""KD losses: hand-computed values, masking, call shape (student, teacher, mask)."""

from __future__ import annotations

import math

import pytest
import torch

from llmkd.infra.artifacts import LlmkdError
from llmkd.losses import (
    KD_LOSSES,
    InfoNCELoss,
    ListwiseKLLoss,
    MarginMSELoss,
    PairwiseHingeLoss,
    RankingDistillationLoss,
    RelaxedRankingLoss,
    build_kd_loss,
)


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


# ---------------------------------------------------------------------------------------------------
# The ranking-distillation family. Hand values are computed on the real candidates only, with Python
# floats; the tensors below add one masked candidate (column 1 of row 0) whose scores would dominate.

S_PAD = [[0.5, 9.0, -1.0, 2.0, 0.0], [1.0, -0.5, 0.3, 2.0, -1.5]]
T_PAD = [[2.0, 5.0, 0.5, -1.0, 1.0], [0.0, 3.0, -2.0, 1.0, 0.5]]
MASK = [[True, False, True, True, True], [True, True, True, True, True]]
ROWS = [  # (student, teacher) over the real candidates of each row
    ([0.5, -1.0, 2.0, 0.0], [2.0, 0.5, -1.0, 1.0]),
    ([1.0, -0.5, 0.3, 2.0, -1.5], [0.0, 3.0, -2.0, 1.0, 0.5]),
]


def padded(s_masked: float = 9.0, t_masked: float = 5.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s, t = [row[:] for row in S_PAD], [row[:] for row in T_PAD]
    s[0][1], t[0][1] = s_masked, t_masked
    return torch.tensor(s, requires_grad=True), torch.tensor(t), torch.tensor(MASK)


def by_teacher(student: list[float], teacher: list[float]) -> list[float]:
    """Student scores ordered by decreasing teacher score (no ties in these examples)."""
    return [s for _, s in sorted(zip(teacher, student), reverse=True)]


def log_sigmoid(x: float) -> float:
    return -math.log(1.0 + math.exp(-x))


def hand_rd(student, teacher, top_k, lam, negatives=False) -> float:
    ss = by_teacher(student, teacher)
    K = min(top_k, len(ss))
    w = [math.exp(-r / lam) for r in range(K)]
    loss = -sum(w[r] / sum(w) * log_sigmoid(ss[r]) for r in range(K))
    if negatives and len(ss) > K:
        loss += sum(-log_sigmoid(-ss[j]) for j in range(K, len(ss))) / (len(ss) - K)
    return loss


def hand_rrd(student, teacher, top_k) -> float:
    ss = by_teacher(student, teacher)
    K = min(top_k, len(ss))
    interesting, uninteresting = ss[:K], ss[K:]
    loss = 0.0
    for k in range(K):
        below = sum(math.exp(x) for x in interesting[k:]) + sum(math.exp(x) for x in uninteresting)
        loss -= interesting[k] - math.log(below)
    return loss


def hand_margin_terms(student, teacher) -> list[float]:
    a = teacher.index(max(teacher))
    return [((student[a] - student[j]) - (teacher[a] - teacher[j])) ** 2 for j in range(len(student)) if j != a]


def hand_hinge_terms(student, teacher, margin, top_k) -> list[float]:
    top = sorted(range(len(teacher)), key=lambda i: -teacher[i])[: top_k or len(teacher)]
    return [
        max(0.0, margin - (student[i] - student[j]))
        for i in top
        for j in range(len(teacher))
        if teacher[i] > teacher[j]
    ]


def hand_infonce_terms(student, teacher, tau, positives) -> list[float]:
    ss = by_teacher(student, teacher)
    pos, neg = ss[:positives], ss[positives:]
    if not neg:
        return []
    z_neg = sum(math.exp(n / tau) for n in neg)
    return [-math.log(math.exp(p / tau) / (math.exp(p / tau) + z_neg)) for p in pos]


def mean_over_rows(fn, **kw) -> float:
    return sum(fn(s, t, **kw) for s, t in ROWS) / len(ROWS)


def mean_over_terms(fn, **kw) -> float:
    terms = [x for s, t in ROWS for x in fn(s, t, **kw)]
    return sum(terms) / len(terms)


def test_hand_helpers_written_out():
    # row 0 in teacher order: student [0.5, 0.0, -1.0, 2.0]
    e = math.exp
    rd = -(1 / (1 + e(-1))) * log_sigmoid(0.5) - (e(-1) / (1 + e(-1))) * log_sigmoid(0.0)
    assert hand_rd(*ROWS[0], top_k=2, lam=1.0) == pytest.approx(rd)
    rrd = -(0.5 - math.log(e(0.5) + e(0.0) + e(-1.0) + e(2.0))) - (0.0 - math.log(e(0.0) + e(-1.0) + e(2.0)))
    assert hand_rrd(*ROWS[0], top_k=2) == pytest.approx(rrd)
    # anchor is candidate 0 (t = 2.0, s = 0.5)
    mm = [((0.5 + 1.0) - (2.0 - 0.5)) ** 2, ((0.5 - 2.0) - (2.0 + 1.0)) ** 2, ((0.5 - 0.0) - (2.0 - 1.0)) ** 2]
    assert hand_margin_terms(*ROWS[0]) == pytest.approx(mm)
    hinge_top1 = [max(0.0, 1.0 - (0.5 - x)) for x in (-1.0, 2.0, 0.0)]
    assert hand_hinge_terms(*ROWS[0], margin=1.0, top_k=1) == pytest.approx(hinge_top1)
    nce = -math.log(e(0.5) / (e(0.5) + e(0.0) + e(-1.0) + e(2.0)))
    assert hand_infonce_terms(*ROWS[0], tau=1.0, positives=1) == pytest.approx([nce])


HAND_CASES = [
    pytest.param(RankingDistillationLoss(top_k=2, lam=1.0), mean_over_rows(hand_rd, top_k=2, lam=1.0), id="rd-k2"),
    pytest.param(RankingDistillationLoss(top_k=10, lam=0.5), mean_over_rows(hand_rd, top_k=10, lam=0.5), id="rd-k10"),
    pytest.param(
        RankingDistillationLoss(top_k=2, lam=2.0, negatives=True),
        mean_over_rows(hand_rd, top_k=2, lam=2.0, negatives=True),
        id="rd-negatives",
    ),
    pytest.param(RelaxedRankingLoss(top_k=2), mean_over_rows(hand_rrd, top_k=2), id="rrd-k2"),
    pytest.param(RelaxedRankingLoss(top_k=3), mean_over_rows(hand_rrd, top_k=3), id="rrd-k3"),
    pytest.param(RelaxedRankingLoss(top_k=10), mean_over_rows(hand_rrd, top_k=10), id="rrd-k10"),
    pytest.param(MarginMSELoss(), mean_over_terms(hand_margin_terms), id="margin-mse"),
    pytest.param(PairwiseHingeLoss(), mean_over_terms(hand_hinge_terms, margin=1.0, top_k=None), id="hinge-all"),
    pytest.param(
        PairwiseHingeLoss(margin=0.5, top_k=2),
        mean_over_terms(hand_hinge_terms, margin=0.5, top_k=2),
        id="hinge-top2",
    ),
    pytest.param(InfoNCELoss(), mean_over_terms(hand_infonce_terms, tau=1.0, positives=1), id="infonce-p1"),
    pytest.param(
        InfoNCELoss(temperature=0.5, positives=2),
        mean_over_terms(hand_infonce_terms, tau=0.5, positives=2),
        id="infonce-p2",
    ),
]


@pytest.mark.parametrize("loss_fn, expected", HAND_CASES)
def test_hand_computed_2_rows_with_mask(loss_fn, expected):
    s, t, mask = padded()
    loss = loss_fn(s, t, mask)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)


ALL_LOSSES = [
    pytest.param(ListwiseKLLoss(2.0), id="listwise_kl"),
    pytest.param(RankingDistillationLoss(top_k=3), id="rd"),
    pytest.param(RankingDistillationLoss(top_k=3, negatives=True), id="rd-negatives"),
    pytest.param(RelaxedRankingLoss(top_k=3), id="rrd"),
    pytest.param(MarginMSELoss(), id="margin-mse"),
    pytest.param(PairwiseHingeLoss(), id="hinge"),
    pytest.param(PairwiseHingeLoss(top_k=2), id="hinge-top2"),
    pytest.param(InfoNCELoss(temperature=0.5, positives=2), id="infonce"),
]
NEW_LOSSES = ALL_LOSSES[1:]


@pytest.mark.parametrize("loss_fn", ALL_LOSSES)
@pytest.mark.parametrize("value", [1e9, -1e9, float("inf"), float("nan")])
def test_masked_candidate_changes_nothing(loss_fn, value):
    s, t, mask = padded()
    base = loss_fn(s, t, mask)
    s2, t2, _ = padded(s_masked=value, t_masked=value)
    loss = loss_fn(s2, t2, mask)
    assert loss.item() == pytest.approx(base.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s2.grad).all()
    assert s2.grad[0, 1] == 0


@pytest.mark.parametrize("loss_fn", ALL_LOSSES)
@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_gradients_finite_and_only_to_student(loss_fn, scale):
    g = torch.Generator().manual_seed(0)
    s = (scale * torch.randn(3, 6, generator=g)).requires_grad_()
    t = (scale * torch.randn(3, 6, generator=g)).requires_grad_()
    mask = torch.rand(3, 6, generator=g) > 0.3
    mask[:, :2] = True
    loss = loss_fn(s, t, mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert t.grad is None
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert (s.grad[~mask] == 0).all()


@pytest.mark.parametrize("loss_fn", ALL_LOSSES)
def test_student_matching_teacher_beats_reversed(loss_fn):
    g = torch.Generator().manual_seed(1)
    t = 3.0 * torch.randn(4, 8, generator=g)
    mask = torch.rand(4, 8, generator=g) > 0.2
    mask[:, :3] = True
    same, reversed_ = loss_fn(t.clone(), t, mask), loss_fn(-t, t, mask)
    assert same.item() < reversed_.item()


@pytest.mark.parametrize("loss_fn", NEW_LOSSES)
def test_empty_rows_are_left_out(loss_fn):
    s, t, mask = padded()
    empty = torch.zeros(1, 5, dtype=torch.bool)
    s2 = torch.cat([s.detach(), torch.full((1, 5), float("nan"))]).requires_grad_()
    loss = loss_fn(s2, torch.cat([t, torch.ones(1, 5)]), torch.cat([mask, empty]))
    assert loss.item() == pytest.approx(loss_fn(s, t, mask).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s2.grad).all() and (s2.grad[2] == 0).all()


@pytest.mark.parametrize("loss_fn", NEW_LOSSES)
def test_only_degenerate_rows_give_finite_loss(loss_fn):
    s = torch.tensor([[1.5, 2.0, 0.0], [0.3, -4.0, 7.0]], requires_grad=True)
    t = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0]])
    mask = torch.tensor([[True, False, False], [False, False, False]])  # one real candidate, then none
    loss = loss_fn(s, t, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    if isinstance(loss_fn, RankingDistillationLoss):  # pointwise: one candidate is enough
        assert loss.item() == pytest.approx(-log_sigmoid(1.5), rel=1e-5)
    else:  # nothing to compare the single candidate with
        assert loss.item() == 0.0 and (s.grad == 0).all()


def test_relaxed_ranking_top_k_1_is_softmax_cross_entropy_on_teacher_top():
    s = torch.tensor([[0.2, 1.0, -0.7, 3.0]])
    t = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    expected = torch.nn.functional.cross_entropy(s, torch.tensor([1]))
    assert RelaxedRankingLoss(top_k=1)(s, t).item() == pytest.approx(expected.item(), rel=1e-6)
    assert InfoNCELoss()(s, t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_margin_mse_is_shift_invariant():
    s, t, mask = padded()
    loss = MarginMSELoss()
    shift = torch.tensor([[3.0], [-2.0]])
    assert loss(s + shift, t - shift, mask).item() == pytest.approx(loss(s, t, mask).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Registry


def test_registry_builds_every_loss():
    assert list(KD_LOSSES) == [
        "listwise_kl",
        "ranking_distillation",
        "relaxed_ranking",
        "margin_mse",
        "pairwise_hinge",
        "infonce",
    ]
    for name, cls in KD_LOSSES.items():
        assert type(build_kd_loss(name)) is cls
    rd = build_kd_loss("ranking_distillation", top_k=5, lam=2.0, negatives=True)
    assert (rd.top_k, rd.lam, rd.negatives) == (5, 2.0, True)
    assert build_kd_loss("listwise_kl", temperature=3.0).temperature == 3.0


def test_build_unknown_loss_names_the_valid_ones():
    with pytest.raises(LlmkdError, match="'lambdarank'") as e:
        build_kd_loss("lambdarank")
    for name in KD_LOSSES:
        assert name in str(e.value)


def test_build_unknown_argument():
    with pytest.raises(LlmkdError, match=r"'infonce'.*tau.*temperature, positives"):
        build_kd_loss("infonce", tau=0.1)
    with pytest.raises(LlmkdError, match="'margin_mse'.*margin"):
        build_kd_loss("margin_mse", margin=1.0)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("ranking_distillation", {"top_k": 0}),
        ("ranking_distillation", {"lam": 0.0}),
        ("relaxed_ranking", {"top_k": -1}),
        ("pairwise_hinge", {"top_k": 0}),
        ("infonce", {"temperature": 0.0}),
        ("infonce", {"positives": 0}),
    ],
)
def test_build_rejects_bad_values(name, kwargs):
    with pytest.raises(LlmkdError, match=name):
        build_kd_loss(name, **kwargs)


# ---------------------------------------------------------------- the hard loss over the whole catalog

@pytest.mark.parametrize("chunk_elements", [1, 7 * 5, 1 << 22])  # one row a chunk, a ragged last chunk, one chunk
def test_full_softmax_loss_equals_cross_entropy_in_value_and_gradients(chunk_elements):
    from llmkd.losses.full_softmax import full_softmax_loss

    torch.manual_seed(0)
    h = (torch.randn(23, 8) * 3).requires_grad_()  # large scores: the max shift matters
    items = torch.randn(7, 8, requires_grad=True)
    y = torch.randint(0, 7, (23,))
    loss = full_softmax_loss(h, items, y, chunk_elements=chunk_elements)
    grads = torch.autograd.grad(2.5 * loss, (h, items))  # the upstream gradient is applied
    ref = torch.nn.functional.cross_entropy(h @ items.T, y)
    ref_grads = torch.autograd.grad(2.5 * ref, (h, items))
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_full_softmax_loss_hand_value_and_empty_input():
    from llmkd.losses.full_softmax import full_softmax_loss

    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # scores: row 0 (1, 0, 0), row 1 (0, 2, 0)
    y = torch.tensor([0, 2])
    hand = ((math.log(math.e + 2) - 1) + math.log(2 + math.e ** 2)) / 2
    assert full_softmax_loss(h, items, y).item() == pytest.approx(hand, rel=1e-6)
    empty = full_softmax_loss(torch.zeros(0, 2, requires_grad=True), items.requires_grad_(), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0
    empty.backward()
    assert items.grad is not None and items.grad.abs().sum() == 0
