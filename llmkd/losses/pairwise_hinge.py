"""Pairwise hinge distillation: the pairwise hinge of RankSVM (Joachims, KDD 2002, "Optimizing Search
Engines using Clickthrough Data") with the teacher's order as the preference labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkd.losses._common import masked_mean, prepare, teacher_topk


class PairwiseHingeLoss(nn.Module):
    """Mean hinge over the teacher-ordered pairs of real candidates:

        loss = mean over (row, i, j) with t[i] > t[j] of max(0, margin - (s[i] - s[j]))

    With top_k set, i is restricted to the row's teacher top-k real candidates and j is any real
    candidate the teacher scores strictly lower than i (other top-k items included). Ties in the
    teacher's scores form no pair. The mean is over all pairs of the batch; 0 if there are none.

    Args:
        margin: the score gap the student must keep between a better and a worse candidate.
        top_k: None for all pairs, or k >= 1 to take the better item from the teacher's top-k only.

    Shapes: student_scores, teacher_scores (B, C) float; mask (B, C) bool, True = real candidate.
    Memory: one (B, C, C) float tensor, or (B, k, C) with top_k.
    """

    def __init__(self, margin: float = 1.0, top_k: int | None = None) -> None:
        super().__init__()
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k}")
        self.margin, self.top_k = margin, top_k

    def forward(
        self, student_scores: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        s, t, mask = prepare(student_scores, teacher_scores, mask)
        if self.top_k is None:
            s_i, t_i, real_i = s, t, mask  # (B, C)
        else:
            idx, real_i = teacher_topk(t, mask, self.top_k)  # (B, k)
            s_i, t_i = s.gather(-1, idx), t.gather(-1, idx)
        pairs = real_i[:, :, None] & mask[:, None, :] & (t_i[:, :, None] > t[:, None, :])  # (B, n_i, C)
        hinge = F.relu(self.margin - (s_i[:, :, None] - s[:, None, :]))  # (B, n_i, C)
        return masked_mean(hinge, pairs)
