"""New items in a serving bundle without retraining, from their text.

The teacher the bundle records (base model + the LoRA adapter copied into `teacher/adapter`, the same
pooling and templates as the teacher cache the student was trained on) embeds the new items' text;
`llmkd.serving.bundle.append_items` stores them as the new items' content rows, with no id embedding, so
the student's own item tower maps each to its content projection -- the vector `llmkd.coldstart` gives
a cold item (tests/test_add_items.py checks they are equal) -- and adds them to the vocabulary, the
student and the index in one atomic rewrite of the bundle.

This module lives outside `llmkd.serving` on purpose: it loads the teacher (transformers, peft),
which the serving room never imports, so a server that only loads and recommends stays light.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmkd.artifacts import LlmkdError, reading
from llmkd.config import TeacherConfig
from llmkd.serving.bundle import TEACHER, read_config


def bundle_teacher(bundle: Path, record: dict):
    """The bundle's recorded teacher as a `TextEncoder` and its `TeacherConfig`; refused when the base model's
    files changed since export (its vectors would not match the stored ones)."""
    from llmkd.teacher import TextEncoder, model_fingerprint, resolve_model_path

    path = resolve_model_path(record["model"])
    if model_fingerprint(path) != record["model_fingerprint"]:
        raise LlmkdError(f"{bundle / TEACHER / 'teacher.json'}: the teacher base model {path} changed since export "
                         f"(fingerprint {model_fingerprint(path)}, recorded {record['model_fingerprint']}); new "
                         "items' vectors would not match the stored ones")
    tc = TeacherConfig(model=record["model"], pooling=record["pooling"], item_template=record["item_template"],
                       max_item_tokens=record["max_item_tokens"], batch_size=record["batch_size"])
    adapter = bundle / TEACHER / record["adapter"] if record["adapter"] else None
    return TextEncoder(tc.model, tc.pooling, tc.batch_size, device="cpu", adapter=adapter), tc


def add_items(bundle: str | Path, items_file: str | Path) -> dict:
    """Add the items of `items_file` (item_id + the columns of the bundle's text template; CSV / TSV /
    Parquet / JSONL) to `bundle`; returns {'added', 'num_items'}."""
    from llmkd.coldstart import teacher_item_vectors
    from llmkd.data import load_items
    from llmkd.serving.bundle import append_items

    bundle = Path(bundle)
    config = read_config(bundle)
    if config.get("item_text") is None:  # before loading anything: say why at once
        raise LlmkdError(f"{bundle}: the student has no item-text vectors (student.content_features: false), so "
                         "it has no projection from text to an item vector; add items by retraining, or export a "
                         "student trained with content_features: true")
    with reading(bundle / TEACHER / "teacher.json", "teacher record"):
        record = json.loads((bundle / TEACHER / "teacher.json").read_text(encoding="utf-8"))
    ids, texts = load_items(items_file, record["text_template"])
    if not ids:
        raise LlmkdError(f"{items_file}: no items")
    encoder, tc = bundle_teacher(bundle, record)
    text = teacher_item_vectors(encoder, texts, tc)  # (M, d_teacher) float32
    return append_items(bundle, ids, text, source=str(items_file))
