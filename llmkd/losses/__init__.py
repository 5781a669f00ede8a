"""Knowledge-distillation losses. Each has the call shape `loss(student_scores, teacher_scores, mask=None)`
with scores (B, C) float over C candidates per row and mask (B, C) bool (True = a real candidate)."""

from llmkd.losses.listwise_kl import ListwiseKLLoss

__all__ = ["ListwiseKLLoss"]
