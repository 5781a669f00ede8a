"""New items in a serving bundle without retraining, from their text.

The teacher the bundle records (base model + the LoRA adapter copied into `teacher/adapter`, the same
pooling and templates as the teacher cache the student was trained on) embeds the new items' text;
`llmkd.serving.bundle.append_items` stores them as the new items' content rows, with no id embedding, so
the student's own item tower maps each to its content projection -- the vector `llmkd.experiments.coldstart` gives
a cold item (tests/test_add_items.py checks they are equal) -- and adds them to the vocabulary, the
student and the index in one atomic rewrite of the bundle.

This module lives outside `llmkd.serving` on purpose: it loads the teacher (transformers, peft),
which the serving room never imports, so a server that only loads and recommends stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmkd.infra.artifacts import LlmkdError, reading
from llmkd.infra.config import TeacherConfig
from llmkd.serving.bundle import TEACHER, append_items, require_item_text
from llmkd.student import TwoTower

if TYPE_CHECKING:
    from llmkd.teacher import TextEncoder


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


def teacher_of(bundle: Path) -> dict:
    """The bundle's teacher record (teacher/teacher.json), once the bundle is known to have a text path."""
    require_item_text(bundle)
    with reading(bundle / TEACHER / "teacher.json", "teacher record"):
        return json.loads((bundle / TEACHER / "teacher.json").read_text(encoding="utf-8"))


def add_item_texts(bundle: str | Path, ids: list[str], texts: list[str], source: str = "new items") -> dict:
    """Add items given as ids and rendered texts (the bundle's text template already applied)."""
    bundle = Path(bundle)
    record = teacher_of(bundle)
    if not ids:
        raise LlmkdError(f"{source}: no items")
    encoder, tc = bundle_teacher(bundle, record)
    text = teacher_item_vectors(encoder, texts, tc)  # (M, d_teacher) float32
    return append_items(bundle, ids, text, source=source)


def add_items(bundle: str | Path, items_file: str | Path) -> dict:
    """Add the items of `items_file` (item_id + the columns of the bundle's text template; CSV / TSV /
    Parquet / JSONL) to `bundle`; returns {'added', 'num_items'}."""
    from llmkd.data import load_items

    record = teacher_of(Path(bundle))  # before reading the file: a bundle without a text path says so at once
    ids, texts = load_items(items_file, record["text_template"])
    return add_item_texts(bundle, ids, texts, source=str(items_file))


def teacher_item_vectors(encoder: TextEncoder, texts: list[str], cfg: TeacherConfig) -> np.ndarray:
    """Unseen items' texts -> (M, d_teacher) float32, embedded as the teacher cache embeds items
    (`teacher.item_template`, `teacher.max_item_tokens`); also the cold-start protocol's
    (`llmkd.experiments.coldstart`)."""
    from llmkd.teacher import item_prompts

    return encoder.encode(item_prompts(texts, cfg), cfg.max_item_tokens, desc="teacher: new items")


def student_item_vectors(model: TwoTower, teacher_vectors: torch.Tensor, folder: Path | str) -> torch.Tensor:
    """(M, d_teacher) teacher vectors -> (M, d) student item vectors through the learned content projection
    (an unseen item has no id embedding); a student without one is refused, saying why."""
    proj = model.item_tower.content_proj
    if proj is None:
        raise LlmkdError(f"{folder}: the student has no content projection (student.content_features: false), "
                         "so it cannot embed unseen items; train one with content_features: true")
    return proj(teacher_vectors)
