"""The serving bundle: everything a trained student needs to recommend, in one folder.

Layout (written atomically by `export_bundle`, rewritten atomically by `append_items`):
    config.json          what the loader needs: format, counts, dims, index settings, the text path
    meta.json            provenance (stage 'bundle'): the run's config, data fingerprint, library versions
    README.md            the model card (`llmkd.serving.card`)
    student/             the towers: config.json + model.safetensors (`TwoTower.save_pretrained`); with
                         `student.content_features` the stored item-text vectors are its
                         `item_tower.content` rows, so one file carries both
    item_ids.json        the vocabulary: row r of every table = item id item_ids[r]
    popularity.json      train interactions per item (the empty-history fallback; 0 for added items)
    index/faiss.index    an `IndexIDMap` (FAISS id = vocabulary row) over the item vectors, type from `index`
                         (+ faiss.index.json: an approximate type's L2 reduction, `llmkd.index.MipsIndex`)
    teacher/             text students only: teacher.json (base model, pooling, templates, fingerprints)
                         and adapter/ (a copy of the LoRA adapter the teacher cache was built with)
    manifest.json        every other file's size and SHA-256 and the bundle's version id
                         (`llmkd.serving.manifest`), written last; every load checks it

Loading needs torch, faiss and safetensors only (`llmkd.serving.recommender`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkd.index import NormAboveMax, build_id_index, read_index, write_index
from llmkd.infra.artifacts import LlmkdError, atomic_dir, new_meta, read_meta, reading, recover_if_needed, write_json
from llmkd.infra.config import Config, IndexConfig
from llmkd.infra.lineage import check_lineage
from llmkd.infra.locks import locked
from llmkd.serving.manifest import check_files, write_manifest
from llmkd.student import TwoTower

FORMAT = "llmkd-bundle"
FORMAT_VERSION = 1
CONFIG = "config.json"
STUDENT = "student"
ITEM_IDS = "item_ids.json"
POPULARITY = "popularity.json"
INDEX = "index/faiss.index"
TEACHER = "teacher"
ONNX_FILE = "user_tower.onnx"  # optional: the user tower as an ONNX graph (`llmkd.serving.onnx`)


def serving_versions() -> dict[str, str]:
    """Versions of the libraries a bundle loads with, beside `library_versions()`'s training ones."""
    import importlib.metadata as md

    out = {}
    for name in ("safetensors", "faiss-cpu", "fastapi", "uvicorn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def load_run_student(out: Path, student: str, fingerprint: str) -> tuple[TwoTower, dict]:
    """The student folder `out/student` and its meta, refused when made from other data or from a teacher
    cache rebuilt since (`llmkd.infra.lineage`)."""
    folder = out / student
    meta = read_meta(folder, "student")
    check_lineage(folder, out, fingerprint)
    model = TwoTower.from_pretrained(folder)
    if model.user_tower.user_embedding is not None:
        raise LlmkdError(f"{folder}: the student uses per-user id embeddings (student.use_user_id: true), which "
                         "cannot serve a new history; export a student trained with use_user_id: false")
    return model, meta


def teacher_record(out: Path, student_meta: dict, folder: Path) -> tuple[dict, Path | None]:
    """What `add_items` needs to embed new item text as the student's content vectors were made: the teacher
    cache's base model, pooling, templates and adapter; refused if the cache changed since training."""
    from llmkd.data import item_text_template  # lazily: loading a bundle needs no pandas

    cache = out / student_meta["config"]["distill"]["teacher"]
    tmeta = read_meta(cache, "teacher")
    used = student_meta.get("teacher_fingerprint")
    now = hashlib.sha256((cache / "meta.json").read_bytes()).hexdigest()[:16]  # as llmkd.distill records it
    if used and used != now:
        raise LlmkdError(f"{cache}: rebuilt since {folder} was trained (teacher_fingerprint {used}, now {now}); "
                         "the stored item-text vectors would not match new items' vectors: retrain the student")
    adapter = Path(tmeta["adapter"]) if tmeta.get("adapter") else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise LlmkdError(f"{cache}/meta.json: adapter {adapter} not found; the bundle must carry it for add_items")
    tc, dc = tmeta["config"], student_meta["config"]["data"]
    record = {"model": tc["model"], "model_path": tmeta["model_path"], "model_fingerprint": tmeta["model_fingerprint"],
              "pooling": tmeta["pooling"], "item_template": tc["item_template"],
              "max_item_tokens": tc["max_item_tokens"], "batch_size": tc["batch_size"],
              "text_template": item_text_template(dc["source"], dc["text_template"]),
              "adapter": "adapter" if adapter else None, "adapter_fingerprint": tmeta.get("adapter_fingerprint"),
              "dim": tmeta["dim"], "cache": str(cache)}
    return record, adapter


def eval_metrics(out: Path, student: str, student_meta: dict) -> dict[str, Any]:
    """Valid/test metrics of `student` from `out/eval/metrics.json`, else the best valid NDCG@10 of training."""
    path = out / "eval" / "metrics.json"
    if path.is_file():
        with reading(path, "metrics"):
            by_system = json.loads(path.read_text(encoding="utf-8"))
        if student in by_system:
            return {"source": str(path), **by_system[student]}
    best = [h for h in student_meta.get("history", []) if h.get("epoch") == student_meta.get("best_epoch")]
    if best:  # the valid metrics of the exported (best) epoch, as training recorded them
        valid = {k: v for k, v in best[0].items() if "@" in k}
        return {"source": f"{out / student}/meta.json (best epoch {best[0]['epoch']})", "valid": valid}
    return {}


@locked(lambda a: a["output"])
def export_bundle(cfg: Config, student: str, output: str | Path) -> Path:
    """Write the bundle of `cfg.out_dir/student` to `output` (atomically): see the module docstring."""
    from llmkd.data import load_data  # lazily, as above: the data artifact gives ids, popularity, fingerprint
    from llmkd.serving.card import model_card

    out, output = Path(cfg.out_dir), Path(output)
    data = load_data(out / "data", need_eval_users=False)
    model, smeta = load_run_student(out, student, data.fingerprint)
    if model.num_items != data.num_items:
        raise LlmkdError(f"{out / student}: {model.num_items} items, the data artifact has {data.num_items}")
    text, adapter = (teacher_record(out, smeta, out / student) if model.item_tower.content_proj is not None
                     else (None, None))
    with torch.inference_mode():
        xb = model.item_vectors().numpy()  # (N, d) float32
    index = build_id_index(xb, cfg.index)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "num_items": data.num_items,
              "dim": int(xb.shape[1]), "max_len": model.max_len, "index": asdict(cfg.index),
              "student": student, "item_text": text, "data_fingerprint": data.fingerprint,
              "metrics": eval_metrics(out, student, smeta), "num_parameters": model.num_parameters(),
              "added_items": []}
    meta = new_meta("bundle", smeta["config"], data.fingerprint, student=str(out / student),
                    num_items=data.num_items, index=asdict(cfg.index))
    meta["versions"] = {**meta["versions"], **serving_versions()}
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp / STUDENT)
        write_json(tmp / ITEM_IDS, data.item_ids)
        write_json(tmp / POPULARITY, [int(c) for c in data.item_counts()])
        (tmp / "index").mkdir()
        write_index(index, tmp / INDEX)
        if text is not None:
            (tmp / TEACHER).mkdir()
            write_json(tmp / TEACHER / "teacher.json", text)
            if adapter is not None:
                shutil.copytree(adapter, tmp / TEACHER / "adapter")
        write_json(tmp / CONFIG, config)
        write_json(tmp / "meta.json", meta)
        (tmp / "README.md").write_text(model_card(config, meta, smeta, data), encoding="utf-8")
        write_manifest(tmp)
    return output


def read_bundle(folder: str | Path, full: bool = False) -> tuple[dict[str, Any], str]:
    """A bundle's config.json and version id, once an interrupted rewrite is repaired and its files match
    its manifest (sizes; with `full`, SHA-256 too: `llmkd.serving.manifest.check_files`)."""
    folder = Path(folder)
    recover_if_needed(folder)
    version = check_files(folder, full)
    return read_config(folder), version


def read_config(folder: str | Path) -> dict[str, Any]:
    """A bundle's config.json, checked to be one (meta.json read first, so an interrupted rewrite is repaired)."""
    folder = Path(folder)
    read_meta(folder, "bundle")
    path = folder / CONFIG
    with reading(path, "bundle config"):
        config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise LlmkdError(f"{path}: expected format {FORMAT} version {FORMAT_VERSION}, found "
                         f"{config.get('format')} version {config.get('format_version')}")
    return config


def grow_student(model: TwoTower, text: torch.Tensor) -> TwoTower:
    """`model` with M new items appended (rows N..N+M-1): no id embedding (zero, as a cold item has none),
    content = `text` (M, content_dim) float32; the padding row moves to N+M. Old items score as before."""
    n, m = model.num_items, len(text)
    state = model.state_dict()
    grown = TwoTower(**{**model.config, "num_items": n + m}).eval()
    emb = state["item_tower.embedding.weight"]
    state["item_tower.embedding.weight"] = torch.cat([emb[:n], torch.zeros(m, emb.shape[1]), emb[n:]])
    content = state["item_tower.content"]
    state["item_tower.content"] = torch.cat([content[:n], text.to(content.dtype), content[n:]])
    grown.load_state_dict(state)
    return grown


def check_new_ids(new_ids: list[str], known: list[str], source: str) -> None:
    """Refuse duplicates within `new_ids` and ids the bundle has already, naming them."""
    seen, dup = set(), []
    for i in new_ids:
        if i in seen:
            dup.append(i)
        seen.add(i)
    have = sorted(seen & set(known))
    if dup or have:
        what = (f"repeated ids {dup[:10]}" if dup else "") + ("; " if dup and have else "") + \
               (f"ids already in the bundle {have[:10]}" if have else "")
        raise LlmkdError(f"{source}: {what}; each new item needs an id the bundle does not have")


def require_item_text(folder: Path, full: bool = False) -> dict[str, Any]:
    """The bundle's config, refused (saying why) when its files do not match its manifest (`read_bundle`) or
    its student has no text path for new items."""
    config, _ = read_bundle(folder, full)
    if config.get("item_text") is None:
        raise LlmkdError(f"{folder}: the student has no item-text vectors (student.content_features: false), so "
                         "it has no projection from text to an item vector; add items by retraining, or export a "
                         "student trained with content_features: true")
    return config


@locked(lambda a: a["folder"])  # read and rewritten under one lock: concurrent additions cannot lose one another
def append_items(folder: str | Path, new_ids: list[str], text: np.ndarray, source: str = "new items") -> dict:
    """Add items to a bundle of a text student: `text` (M, content_dim) float32 are their teacher vectors;
    the student's content projection maps them, and they join the vocabulary, the student and the index.
    The whole bundle is rewritten in a sibling and swapped in, so a crash leaves the old one intact; every
    file is hashed first (a new manifest over a damaged file would vouch for it) and the manifest rewritten
    last. A user-tower ONNX graph is dropped: it holds the old item table (`llmkd export-onnx` again)."""
    folder = Path(folder)
    config = require_item_text(folder, full=True)
    text = np.ascontiguousarray(text, dtype=np.float32)
    known = json.loads((folder / ITEM_IDS).read_text(encoding="utf-8"))
    check_new_ids(new_ids, known, source)
    model = TwoTower.from_pretrained(folder / STUDENT)
    if text.shape != (len(new_ids), model.item_tower.content.shape[1]):
        raise LlmkdError(f"{source}: teacher vectors of shape {text.shape}, expected ({len(new_ids)}, "
                         f"{model.item_tower.content.shape[1]}) (the teacher the bundle records)")
    grown = grow_student(model, torch.from_numpy(text))
    with torch.inference_mode():
        xb = grown.item_vectors()[model.num_items :].numpy()  # (M, d): the projection of each text vector
    n = model.num_items
    index = read_index(folder / INDEX)
    try:
        index.add_with_ids(xb, np.arange(n, n + len(new_ids), dtype=np.int64))
    except NormAboveMax:  # a new vector longer than any the L2 reduction was built for: rebuild over all items
        with torch.inference_mode():
            index = build_id_index(grown.item_vectors().numpy(), IndexConfig(**config["index"]))
    popularity = json.loads((folder / POPULARITY).read_text(encoding="utf-8")) + [0] * len(new_ids)
    config = {**config, "num_items": n + len(new_ids),
              "added_items": [*config["added_items"], {"source": source, "count": len(new_ids)}]}
    with atomic_dir(folder) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        grown.save_pretrained(tmp / STUDENT)
        write_json(tmp / ITEM_IDS, known + list(new_ids))
        write_json(tmp / POPULARITY, popularity)
        for old_file in (tmp / "index").iterdir():  # a rebuilt index may come without the reduction's record
            old_file.unlink()
        write_index(index, tmp / INDEX)
        write_json(tmp / CONFIG, config)
        with open(tmp / "README.md", "a", encoding="utf-8") as f:
            f.write(f"\n- Added after export: {len(new_ids)} items from {source} (text through the teacher and "
                    f"the student's content projection; no id embedding); catalog now {n + len(new_ids)} items.\n")
        (tmp / ONNX_FILE).unlink(missing_ok=True)
        write_manifest(tmp)
    return {"added": len(new_ids), "num_items": n + len(new_ids)}
