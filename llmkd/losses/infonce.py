"""InfoNCE with the teacher's top candidates as positives (van den Oord et al., 2018, "Representation
Learning with Contrastive Predictive Coding"; the sampled-softmax form used for recommendation)."""

from __future__ import annotations

import torch
from torch import nn

from llmkd.losses._common import masked_logsumexp, masked_mean, prepare, scatter_flags, teacher_topk


class InfoNCELoss(nn.Module):
    """Each teacher-top positive is contrasted against the row's non-positive real candidates:

        loss_p = -log( exp(s[p]/tau) / (exp(s[p]/tau) + sum_{n real, n not in P} exp(s[n]/tau)) )

    P is the row's top-`positives` real candidates by teacher score (fewer if the row has fewer real
    candidates); the other positives are left out of each term's denominator. The result is the mean of
    loss_p over all (row, p) terms of the batch, counting only rows with at least one negative (with none,
    every term would be -log 1 = 0); 0 if there are no such terms. Computed with a masked logsumexp.

    Args:
        temperature: tau > 0, dividing the student scores.
        positives: |P| >= 1, the number of teacher top candidates used as positives.

    Shapes: student_scores, teacher_scores (B, C) float; mask (B, C) bool, True = real candidate.
    Memory: one (B, positives, C) float tensor.
    """

    def __init__(self, temperature: float = 1.0, positives: int = 1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if positives < 1:
            raise ValueError(f"positives must be >= 1, got {positives}")
        self.temperature, self.positives = temperature, positives

    def forward(
        self, student_scores: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        s, t, mask = prepare(student_scores, teacher_scores, mask)
        logits = s / self.temperature  # (B, C)
        idx, valid = teacher_topk(t, mask, self.positives)  # (B, P)
        negatives = mask & ~scatter_flags(idx, valid, s.shape[-1])  # (B, C)
        is_p = torch.arange(s.shape[-1], device=s.device) == idx[:, :, None]  # (B, P, C)
        log_denom = masked_logsumexp(logits[:, None, :], is_p | negatives[:, None, :])  # (B, P)
        terms = log_denom - logits.gather(-1, idx)  # (B, P)
        return masked_mean(terms, valid & negatives.any(-1, keepdim=True))
