"""Shared pieces of the KD losses: input checks, the teacher's top-k, and masked reductions.

Every loss first calls `prepare`, which zeroes both score lists where the mask is False. Padding values
(huge, inf or NaN) therefore never reach a loss value or a gradient; the masks below decide which of the
zeroed entries take part.
"""

from __future__ import annotations

import torch


def prepare(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes and return (s, t, mask): s, t (B, C) float with masked entries set to 0, t detached;
    mask (B, C) bool, all True when None."""
    assert student_scores.dim() == 2, student_scores.shape
    assert student_scores.shape == teacher_scores.shape, (student_scores.shape, teacher_scores.shape)
    if mask is None:
        mask = torch.ones_like(student_scores, dtype=torch.bool)
    assert mask.shape == student_scores.shape and mask.dtype == torch.bool, (mask.shape, mask.dtype)
    s = student_scores.masked_fill(~mask, 0.0)
    t = teacher_scores.detach().masked_fill(~mask, 0.0)
    return s, t, mask


def teacher_topk(t: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k real candidates per row, best first: idx (B, k') long and valid (B, k') bool,
    k' = min(k, C). `valid` is False in the tail of rows with fewer than k' real candidates (ties between
    equal teacher scores are broken by torch.topk)."""
    k = min(k, t.shape[-1])
    idx = t.masked_fill(~mask, float("-inf")).topk(k, dim=-1).indices  # (B, k)
    return idx, mask.gather(-1, idx)


def scatter_flags(idx: torch.Tensor, flags: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """(B, C) bool: True at idx[b, r] where flags[b, r]; idx (B, k) long with distinct entries per row."""
    out = torch.zeros(idx.shape[0], num_candidates, dtype=torch.bool, device=idx.device)
    return out.scatter(-1, idx, flags)


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of x (broadcast to mask's shape) where mask is True; (...) float.
    Slices with no True entry give 0 instead of -inf, so neither the value nor the gradient is NaN."""
    any_ = mask.any(-1, keepdim=True)
    x = x.expand(mask.shape).masked_fill(~(mask | ~any_), float("-inf"))
    return torch.where(any_.squeeze(-1), x.logsumexp(-1), torch.zeros_like(x[..., 0]))


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the entries where `keep` is True, same shape; 0 (still in the graph) if none.
    Reduces over all dims, so pass (B,) per-row values for a mean over rows."""
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    return total / keep.sum().clamp(min=1)


def row_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B,) mean of values (B, C) over each row's entries where keep (B, C) is True; 0 for empty rows."""
    total = torch.where(keep, values, torch.zeros_like(values)).sum(-1)
    return total / keep.sum(-1).clamp(min=1)
