"""Listwise KL distillation (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ListwiseKLLoss(nn.Module):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over each row's candidates, mean over rows.

    Args:
        temperature: T, applied to both score lists; the T^2 factor keeps gradient size independent of T.

    Shapes: student_scores, teacher_scores (B, C) float; mask (B, C) bool, True where the candidate is
    real (padding / duplicate candidates are dropped from both distributions).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self, student_scores: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert student_scores.shape == teacher_scores.shape, (student_scores.shape, teacher_scores.shape)
        T = self.temperature
        s, t = student_scores / T, teacher_scores.detach() / T
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
            t = t.masked_fill(~mask, float("-inf"))
        log_p_s = F.log_softmax(s, dim=-1)
        log_p_t = F.log_softmax(t, dim=-1)
        p_t = log_p_t.exp()
        kl = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t)).sum(-1)  # (B,)
        return T * T * kl.mean()
