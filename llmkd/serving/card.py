"""The bundle's model card (README.md): what the model was trained on, how, how well, and how to use it.

Everything comes from the artifacts' own records (the student's meta.json with its resolved config,
the bundle config, `eval/metrics.json`), so the card cannot drift from what was exported.
"""

from __future__ import annotations

from typing import Any

METRIC_ORDER = ("ndcg@10", "recall@10", "mrr@10", "ndcg@20", "recall@20", "ndcg@50", "recall@50", "users")


def metrics_table(metrics: dict[str, Any]) -> list[str]:
    """A markdown table of valid/test metrics, or a line saying none were recorded."""
    splits = [s for s in ("valid", "test") if s in metrics]
    if not splits:
        return ["No evaluation was recorded for this student (run scripts/evaluate.py before exporting)."]
    names = [m for m in METRIC_ORDER if any(m in metrics[s] for s in splits)]
    lines = [f"From `{metrics['source']}` (full ranking over the catalog, seen items masked).", "",
             "| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for s in splits:
        cells = [f"{metrics[s][m]:.4f}" if isinstance(metrics[s].get(m), float) else str(metrics[s].get(m, ""))
                 for m in names]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def recipe_lines(run: dict[str, Any], student_meta: dict[str, Any]) -> list[str]:
    """The distillation recipe of the student's run, as bullet points."""
    d, s = run["distill"], run["student"]
    kd = (f"KD loss {d['kd_loss']} (alpha {d['alpha']}, temperature {d['temperature']}, teacher top-{d['kd_top_k']})"
          if d["alpha"] > 0 else "no KD loss (alpha 0)")
    return [
        (f"- Student: {s['pooling']} user tower, dim {s['dim']}, {s['num_layers']} layer(s); item tower = id "
         "embedding" + (" + projected item-text vectors of the teacher" if s["content_features"] else "")),
        (f"- Training: {student_meta.get('hard_loss', d['loss'])} hard loss, {kd}, user_align {d['user_align']}, item_align {d['item_align']}; "
         f"best epoch {student_meta.get('best_epoch')} of {student_meta.get('epochs_run')}, seed {d['seed']}"),
    ]


def used_teacher(run: dict[str, Any]) -> bool:
    """Whether the student's training read the teacher (a KD or alignment term, or its item-text vectors)."""
    d = run["distill"]
    return d["alpha"] > 0 or d["user_align"] > 0 or d["item_align"] > 0 or run["student"]["content_features"]


def teacher_line(run: dict[str, Any]) -> str:
    t = run["teacher"]
    if not used_teacher(run):
        return f"- Teacher: none used (trained without the teacher; the run's config names `{t['model']}`)"
    return (f"- Teacher: `{t['model']}`" + (f" with LoRA adapter `{t['adapter']}`" if t.get("adapter") else "")
            + f", {t['user_mode']} user mode; teacher cache `{run['distill']['teacher']}`")


def model_card(config: dict[str, Any], meta: dict[str, Any], student_meta: dict[str, Any], data: Any) -> str:
    """The README.md of a bundle (markdown)."""
    run = student_meta["config"]
    dc = run["data"]
    text = config["item_text"]
    interactions = sum(len(h) for h in data.train)
    source = dc["source"] if dc["source"] != "files" else f"files {dc['interactions']} + {dc['items']}"
    lines = [
        f"# llmkd recommender bundle: `{config['student']}`", "",
        ("A two-tower recommender " + ("distilled from a language-model teacher" if used_teacher(run) else
                                       "trained without a teacher")
         + ": a user vector from the history, item vectors in a FAISS index, score = dot product. Loads with "
         "torch, faiss and safetensors only."), "",
        "## Use", "",
        "```python", "from llmkd import Recommender", "r = Recommender.from_pretrained('<this folder>')",
        "r.recommend(['<item id>', '<item id>'], k=10)   # {'items': [...], 'scores': [...]}", "```", "",
        "HTTP: `python scripts/serve.py <this folder> --port 8000` (OpenAPI at /docs).", "",
        "## Data", "",
        f"- Source: {source}; item text template `{dc['text_template']}`",
        (f"- {data.num_users} users, {data.num_items} items, {interactions} train interactions; "
         f"data fingerprint `{data.fingerprint}`"),
        "- Empty history: the most popular items in train (`popularity.json`)", "",
        "## Teacher and recipe", "",
        teacher_line(run),
        *recipe_lines(run, student_meta),
        "- Item-text vectors: " + (f"stored ({text['dim']}-d, base `{text['model_path']}`, pooling {text['pooling']}"
                                   + (", adapter copied to teacher/adapter" if text["adapter"] else "")
                                   + "); new items can be added from text (scripts/add_items.py)"
                                   if text else "none (new items need retraining)"), "",
        "## Metrics", "", *metrics_table(config["metrics"]), "",
        "## Parameters and index", "",
        (f"- Student parameters: {config['num_parameters']:,}; vectors {config['dim']}-d; history window "
         f"{config['max_len']} items"),
        f"- FAISS index: {config['index']['type']} (inner product) inside an IndexIDMap (id = row of item_ids.json)", "",
        "## Library versions", "",
        *[f"- {k} {v}" for k, v in meta["versions"].items()], "",
        "## Changes", "",
        f"- Exported {meta['created']} from `{meta['student']}`.",
    ]
    return "\n".join(lines) + "\n"
