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
from llmkd.config import Config, TeacherConfig
from llmkd.serving.bundle import TEACHER, append_items, require_item_text


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
    from llmkd.coldstart import teacher_item_vectors

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


def cold_start_through_bundle(cfg: Config, student: str, output: str | Path,
                              ks: tuple[int, ...] = (10, 20, 50)) -> dict:
    """The cold-start protocol (`llmkd.coldstart`) served: export `student`, add the run's withheld items to the
    bundle from their text, and rank the whole catalog for each cold user with `Recommender` (seen items
    excluded). Recall / NDCG match the cold-start evaluation's FAISS row when the added vectors are its vectors."""
    from llmkd.coldstart import set_metrics, warm_histories
    from llmkd.data import load_data
    from llmkd.serving import Recommender, export_bundle

    data = load_data(Path(cfg.out_dir) / "data")
    if not data.cold_item_ids:
        raise LlmkdError(f"{Path(cfg.out_dir) / 'data'}: no cold items; set data.cold_items (e.g. 0.1) and rerun "
                         "prepare_data.py")
    bundle = export_bundle(cfg, student, output)
    add_item_texts(bundle, data.cold_item_ids, data.cold_item_texts, source="the run's cold items")
    rec = Recommender.from_pretrained(bundle)
    users = sorted({u for us in data.cold_item_users for u in us})
    relevant = [set() for _ in users]
    where = {u: row for row, u in enumerate(users)}
    for c, us in enumerate(data.cold_item_users):
        for u in us:
            relevant[where[u]].add(data.num_items + c)  # bundle rows: warm items, then the cold ones in order
    hists = [[data.item_ids[i] for i in h] for h in warm_histories(data, users)]
    top = [[rec.row[i] for i in r["items"]] for r in rec.recommend_batch(hists, min(max(ks), rec.num_items))]
    return {"users": len(users), "cold_items": len(data.cold_item_ids), "index": cfg.index.type,
            "whole catalog": set_metrics(top, relevant, list(ks))}
