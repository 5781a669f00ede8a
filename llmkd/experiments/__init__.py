"""Experiments: the drivers that measure the pipeline rather than make or serve a recommender.

    kd_benchmark   which distillation lifts the student: every KD family chosen on valid, over seeds
    seeds          no-KD vs KD students over several seeds, mean +- std and paired intervals
    online         online cost of the teacher vs students (user tower + FAISS), side by side
    coldstart      items withheld from every training stage, recommended from their text
    serving_cost   the serving bundle's API and HTTP service vs the teachers, side by side
    scale_micro    catalog-size micro-benchmarks: full vs sampled softmax, KD candidates, blocked eval, index

They import the core modules (data, teacher, student, distill, distill.recipe, index, evaluation.metrics,
evaluation.report, ...) and `llmkd.serving`; the core never imports them (tests/test_experiments_layout.py holds
it to that), so `llmkd/` reads as core, `experiments/` and `serving/`.
"""
