"""Knowledge-distillation losses. Each has the call shape `loss(student_scores, teacher_scores, mask=None)`
with scores (B, C) float over C candidates per row and mask (B, C) bool (True = a real candidate), and
returns a scalar. `build_kd_loss(name, **kwargs)` makes one from its name in `KD_LOSSES`."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from llmkd.infra.artifacts import LlmkdError
from llmkd.losses.infonce import InfoNCELoss
from llmkd.losses.listwise_kl import ListwiseKLLoss
from llmkd.losses.margin_mse import MarginMSELoss
from llmkd.losses.pairwise_hinge import PairwiseHingeLoss
from llmkd.losses.ranking_distillation import RankingDistillationLoss
from llmkd.losses.relaxed_ranking import RelaxedRankingLoss

KD_LOSSES: dict[str, type[nn.Module]] = {
    "listwise_kl": ListwiseKLLoss,
    "ranking_distillation": RankingDistillationLoss,
    "relaxed_ranking": RelaxedRankingLoss,
    "margin_mse": MarginMSELoss,
    "pairwise_hinge": PairwiseHingeLoss,
    "infonce": InfoNCELoss,
}


def build_kd_loss(name: str, **kwargs: Any) -> nn.Module:
    """The KD loss registered as `name`, built with `kwargs`; LlmkdError for an unknown name, an unknown
    keyword or a value the loss rejects."""
    if name not in KD_LOSSES:
        raise LlmkdError(f"unknown KD loss {name!r}; valid names: {', '.join(KD_LOSSES)}")
    cls = KD_LOSSES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise LlmkdError(
            f"KD loss {name!r} got unknown argument(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or '(none)'}"
        )
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise LlmkdError(f"KD loss {name!r}: {e}") from e


__all__ = [
    "KD_LOSSES",
    "InfoNCELoss",
    "ListwiseKLLoss",
    "MarginMSELoss",
    "PairwiseHingeLoss",
    "RankingDistillationLoss",
    "RelaxedRankingLoss",
    "build_kd_loss",
]
