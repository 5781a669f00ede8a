"""Relaxed ranking distillation, RRD (Kang et al., CIKM 2020, "DE-RRD: A Knowledge Distillation
Framework for Recommender System")."""

from __future__ import annotations

import torch
from torch import nn

from llmkd.losses._common import masked_logsumexp, masked_mean, prepare, scatter_flags, teacher_topk


class RelaxedRankingLoss(nn.Module):
    """Plackett-Luce likelihood of the teacher's top-K order, with the rest of the list left unordered:

        loss_row = -sum_{k=1}^{K} [ s[pi_k] - log( sum_{j=k}^{K} exp(s[pi_j]) + sum_{u in U} exp(s[u]) ) ]

    pi_1..pi_K are the row's top-K real candidates by teacher score ("interesting"), K = min(top_k, number
    of real candidates), and U the row's other real candidates ("uninteresting"; the paper samples them,
    here all are used). The sum over k is not divided by K, as in the paper and its official code. Each
    log-sum is a masked logsumexp, so large scores do not overflow. The result is the mean over rows with
    at least two real candidates (a single candidate gives an identically zero term); 0 if there are none.

    Args:
        top_k: K, the number of teacher top candidates whose order is distilled (>= 1).

    Shapes: student_scores, teacher_scores (B, C) float; mask (B, C) bool, True = real candidate.
    Memory: one (B, K, C) float tensor.
    """

    def __init__(self, top_k: int = 10) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k

    def forward(
        self, student_scores: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        s, t, mask = prepare(student_scores, teacher_scores, mask)
        B, C = s.shape
        idx, valid = teacher_topk(t, mask, self.top_k)  # (B, K)
        K = idx.shape[-1]
        steps = torch.arange(K, device=s.device)
        interesting = scatter_flags(idx, valid, C)  # (B, C)
        uninteresting = mask & ~interesting
        rank = torch.full((B, C), K, device=s.device).scatter(-1, idx, steps.expand(B, K))  # (B, C)
        later = interesting[:, None, :] & (rank[:, None, :] >= steps[None, :, None])  # (B, K, C)
        log_denom = masked_logsumexp(s[:, None, :], later | uninteresting[:, None, :])  # (B, K)
        terms = s.gather(-1, idx) - log_denom  # (B, K)
        per_row = -torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)  # (B,)
        return masked_mean(per_row, mask.sum(-1) >= 2)
