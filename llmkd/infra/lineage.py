"""Lineage: which artifacts an artifact was built from, and whether they are still the same ones.

Every artifact's `meta.json` carries `data_fingerprint` (the data it was made from) and `inputs`:
{role: {"folder": path relative to out_dir, "fingerprint": that artifact's `fingerprint` then}}, e.g. a
student's teacher cache, an index's student, a teacher cache's LoRA adapter. An artifact's fingerprint is
the hash of its `meta.json`, which changes whenever the artifact is rebuilt (timestamps and timings are
in it) and never otherwise; a copy (a reused run) keeps it.

`check_lineage` walks the whole chain upstream first, so the message names the first stale folder
(rebuild that one, then what follows) and the command that rebuilds it. An input folder that no longer
exists is not checked (the artifact stands on its own). Artifacts made before `inputs` was recorded are
read through their older fields (a student's `teacher_fingerprint`) where they have one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from llmkd.infra.artifacts import META_FILE, LlmkdError

REBUILD = {
    "data": "python scripts/prepare_data.py --config <config>",
    "teacher_lora": "accelerate launch scripts/finetune_teacher.py --config <config> --force",
    "teacher": "python scripts/build_teacher.py --config <config> --force{name}",
    "student": "accelerate launch scripts/distill.py --config <config> --set distill.name={folder}",
    "index": "python scripts/build_index.py --config <config> --student {student}",
    "eval": "python scripts/evaluate.py --config <config>",
}
"""The command that rebuilds each stage's artifact (placeholders filled in by `rebuild_command`)."""


def fingerprint(folder: str | Path) -> str:
    """A short hash of an artifact's meta.json: changes whenever the artifact is rebuilt."""
    return hashlib.sha256((Path(folder) / META_FILE).read_bytes()).hexdigest()[:16]


def teacher_fingerprint(folder: str | Path) -> str:
    """The `fingerprint` of a teacher cache, as a student records it (`teacher_fingerprint` in its meta.json)
    and as checkpoints (`llmkd.infra.checkpoints`) and reuse (`llmkd.infra.reuse`) compare it."""
    return fingerprint(folder)


def input_record(out_dir: str | Path, folder: str | Path) -> dict[str, str]:
    """{"folder", "fingerprint"} of an input artifact, its folder relative to `out_dir` where it is inside."""
    out_dir, folder = Path(out_dir), Path(folder)
    try:
        name = str(folder.resolve().relative_to(out_dir.resolve()))
    except ValueError:
        name = str(folder.resolve())
    return {"folder": name, "fingerprint": fingerprint(folder)}


def inputs_of(meta: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The recorded inputs of an artifact (older students: from `teacher_fingerprint`)."""
    inputs = dict(meta.get("inputs") or {})
    if "inputs" not in meta and meta.get("stage") == "student" and meta.get("teacher_fingerprint"):
        teacher = ((meta.get("config") or {}).get("distill") or {}).get("teacher", "teacher")
        inputs["teacher"] = {"folder": teacher, "fingerprint": meta["teacher_fingerprint"]}
    return inputs


def read(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LlmkdError(f"{folder / META_FILE}: unreadable ({e}); rebuild it") from None


def rebuild_command(meta: dict[str, Any], folder: Path, out_dir: Path) -> str:
    """The command that rebuilds the artifact in `folder`."""
    stage = meta.get("stage", "")
    try:
        name = str(folder.resolve().relative_to(out_dir.resolve()))
    except ValueError:
        name = folder.name
    return REBUILD.get(stage, "its stage's script").format(
        folder=name, student=meta.get("student", "<student>"), name="" if name == "teacher" else f" --name {name}")


def check_lineage(folder: str | Path, out_dir: str | Path, data_fingerprint: str | None = None) -> None:
    """Refuse `folder` when an artifact it was built from, directly or further up, was rebuilt since it
    was made (or was made from other data than `data_fingerprint`): one line naming the stale folder
    and the command that rebuilds it."""
    folder, out_dir = Path(folder), Path(out_dir)
    meta = read(folder)
    if data_fingerprint is not None and meta.get("data_fingerprint") not in (None, data_fingerprint):
        raise LlmkdError(f"{folder}: made from other data (data_fingerprint {meta.get('data_fingerprint')}, "
                         f"expected {data_fingerprint}); rebuild it: {rebuild_command(meta, folder, out_dir)}")
    for role, record in inputs_of(meta).items():
        source = out_dir / record["folder"]
        if not (source / META_FILE).is_file():
            continue
        check_lineage(source, out_dir, data_fingerprint)
        if fingerprint(source) != record["fingerprint"]:
            raise LlmkdError(f"{folder}: stale, built from {source} before that {role} was rebuilt; "
                             f"rebuild it: {rebuild_command(meta, folder, out_dir)}")


def files_load(folder: str | Path) -> bool:
    """True when every safetensors and JSON file directly in `folder` opens (a truncated or corrupt cache
    must be rebuilt, never reused)."""
    from safetensors import safe_open

    for path in sorted(Path(folder).iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "np") as f:  # checks the header covers the whole file
                    list(f.keys())
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except Exception:  # SafetensorError, OSError, ValueError: all mean "cannot be used"
            return False
    return True
