"""The evaluation folder: the metrics room and the evaluation room.

    metrics   full-ranking Recall / NDCG / MRR / HitRate, seen items masked (the metrics room: used by tuning,
              training and the evaluation stage, below the index, the teacher and the student)
    report    the evaluation stage: every system of a run on valid and test (`eval/`)
    ann       ANN sweep: recall@k against exact search and queries/s per index type

This file imports nothing, so `llmkd.evaluation.metrics` loads without the evaluation stage. See
docs/architecture.md.
"""
