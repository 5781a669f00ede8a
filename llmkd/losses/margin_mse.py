"""Margin-MSE distillation (Hofstätter et al., 2020, "Improving Efficient Neural Ranking Models with
Cross-Architecture Knowledge Distillation", arXiv:2010.02666)."""

from __future__ import annotations

import torch
from torch import nn

from llmkd.losses._common import masked_mean, prepare


class MarginMSELoss(nn.Module):
    """The student matches the teacher's score margins between an anchor and every other candidate:

        loss = mean over (row, j) of ((s[a] - s[j]) - (t[a] - t[j]))^2

    a is the row's real candidate with the highest teacher score (the paper's positive passage; ties go
    to the first), j runs over the row's other real candidates (the paper's negatives). The mean is over
    all (row, j) pairs of the batch, so rows with fewer than two real candidates add nothing; 0 if no
    pair exists. Invariant to adding a per-row constant to either score list.

    Shapes: student_scores, teacher_scores (B, C) float; mask (B, C) bool, True = real candidate.
    """

    def forward(
        self, student_scores: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        s, t, mask = prepare(student_scores, teacher_scores, mask)
        a = t.masked_fill(~mask, float("-inf")).argmax(-1, keepdim=True)  # (B, 1)
        diff = (s.gather(-1, a) - s) - (t.gather(-1, a) - t)  # (B, C)
        pairs = mask & (torch.arange(s.shape[-1], device=s.device) != a)  # (B, C)
        return masked_mean(diff.square(), pairs)
