"""Ranking distillation (Tang & Wang, KDD 2018, "Ranking Distillation: Learning Compact Ranking Models
With High Performance for Recommender System")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkd.losses._common import masked_mean, prepare, row_mean, scatter_flags, teacher_topk


class RankingDistillationLoss(nn.Module):
    """The teacher's top-K real candidates are pseudo-positives, weighted by position:

        loss_row = -sum_{r=0}^{K-1} w_r log sigmoid(s[pi_r]),   w_r = exp(-r / lam) / sum_r' exp(-r' / lam)

    where pi_0..pi_{K-1} are the row's real candidates in decreasing teacher score and K = min(top_k, number
    of real candidates). Counting r from 0 instead of the paper's 1 changes nothing after normalisation.
    The result is the mean over rows with at least one real candidate (rows with none are left out of
    the mean, like `ignore_index` in cross-entropy); 0 if no row has one.

    Only the paper's position-importance weight w^a is implemented; its dynamic (ranking-discrepancy) and
    hybrid weightings, which need the student's rank of each item over the whole catalogue, are not.

    The paper's distillation term L_D uses the top-K as positives only; negatives there come from the
    ground-truth loss L_R (binary cross-entropy with sampled negatives), and lower-ranked teacher items
    are not treated as negatives. `negatives=True` adds that L_R-style negative term with the row's other
    real candidates as pseudo-negatives, averaged with equal weight:

        loss_row += mean_{j real, j not in top-K} -log sigmoid(-s[j])     (0 when there are none)

    Args:
        top_k: K, the number of teacher top candidates used as positives (>= 1).
        lam: lambda > 0, the decay of the position weights; small lam puts the weight on the first item.
        negatives: add the pseudo-negative term above (an extension, off by default as in the paper).

    Shapes: student_scores, teacher_scores (B, C) float; mask (B, C) bool, True = real candidate.
    """

    def __init__(self, top_k: int = 10, lam: float = 1.0, negatives: bool = False) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.top_k, self.lam, self.negatives = top_k, lam, negatives

    def forward(
        self, student_scores: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        s, t, mask = prepare(student_scores, teacher_scores, mask)
        idx, valid = teacher_topk(t, mask, self.top_k)  # (B, K)
        r = torch.arange(idx.shape[-1], dtype=s.dtype, device=s.device)
        w = torch.exp(-r / self.lam) * valid  # (B, K); w_0 = 1 in every row with a real candidate
        w = w / w.sum(-1, keepdim=True).clamp(min=1.0)
        per_row = -(w * F.logsigmoid(s.gather(-1, idx))).sum(-1)  # (B,)
        if self.negatives:
            neg = mask & ~scatter_flags(idx, valid, s.shape[-1])  # (B, C)
            per_row = per_row + row_mean(-F.logsigmoid(-s), neg)
        return masked_mean(per_row, mask.any(-1))
