"""Reuse of finished students: a run whose training inputs are unchanged is not trained again.

A student folder can stand for a requested run when its training key (data, student and distill
settings, and the teacher settings when it learns from one; never the run's name) and its data
fingerprint match, and, if it learns from a teacher, the teacher cache it read is the same one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llmkd.infra.artifacts import LlmkdError, atomic_dir
from llmkd.infra.config import Config, from_dict
from llmkd.infra.lineage import files_load, teacher_fingerprint

TEACHER_ONLY = ("teacher", "temperature", "teacher_scale", "kd_top_k", "kd_loss", "kd_args", "neighbor_smoothing",
                "neighbor_k")
SPEED_ONLY = ("length_groups",)
"""Settings that change how fast a run trains, not what it learns (only dropout's draws differ): a run
trained or checkpointed with another value stands for this one."""


def training_key(cfg: Config, num_items: int | None = None, epochs: bool = True) -> dict:
    """What a student's training depends on, besides the data and the teacher cache's contents: the data,
    student and distill settings (not the run's name; without the teacher fields when it uses no teacher,
    so the no-KD twin is the same whatever teacher the KD variants learn from) and the teacher config.
    Given the catalog size, 'auto' settings count as what they resolve to (`distill.loss`, `kd_index`), so
    a run recorded with 'full_softmax' is the same run as 'auto' on a catalog where auto means that, whatever
    its `num_negatives` (read by the sampled softmax only).
    `epochs=False` leaves the epoch cap out (`same_epochs` decides it)."""
    d = cfg.to_dict()
    skip = ("name", *SPEED_ONLY) if cfg.uses_teacher else ("name", *SPEED_ONLY, *TEACHER_ONLY)
    skip = skip if epochs else (*skip, "epochs")
    distill = {k: v for k, v in d["distill"].items() if k not in skip}
    if num_items is not None:
        distill["loss"] = cfg.distill.hard_loss_for(num_items)
        if distill["loss"] == "full_softmax":
            distill.pop("num_negatives", None)  # read by the sampled softmax only
        distill["item_updates"] = cfg.item_updates_for(num_items, strict=False)
        distill.pop("sampled_above", None)
        if "kd_index" in distill:
            distill["kd_index"] = cfg.distill.kd_index_for(num_items)
            distill.pop("kd_exact_max_items", None)
    key = {"data": d["data"], "student": d["student"], "distill": distill}
    if cfg.uses_teacher:
        key["teacher"] = d["teacher"]
    return key


def reusable(folder: Path, cfg: Config, data_fingerprint: str, num_items: int | None = None,
             pruned_ok: bool = False) -> bool:
    """A finished student in `folder` trained with the same training key on this data (and, if it learns
    from a teacher, from the same teacher cache) can stand for a run of `cfg`, if its files load. Config
    fields added since it was trained take their defaults. A run a pruned search stopped early
    (`pruned_at_epoch` in its meta.json) stands only for a run of a pruned search (`pruned_ok`)."""
    if not (folder / "meta.json").is_file() or not (folder / "model.safetensors").is_file() or not files_load(folder):
        return False
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    try:
        then = from_dict(Config, meta.get("config", {}))
    except LlmkdError:
        return False
    if (training_key(then, num_items, epochs=False) != training_key(cfg, num_items, epochs=False)
            or meta.get("data_fingerprint") != data_fingerprint or not same_epochs(then, cfg, meta)
            or (meta.get("pruned_at_epoch") and not pruned_ok)):
        return False
    if cfg.uses_teacher:
        teacher = Path(cfg.out_dir) / cfg.distill.teacher
        return (teacher / "meta.json").is_file() and meta.get("teacher_fingerprint") == teacher_fingerprint(teacher)
    return True


def same_epochs(then: Config, cfg: Config, meta: dict) -> bool:
    """Whether a finished run with cap `then.distill.epochs` is the run `cfg`'s cap would train: the same
    cap, or a run that early stopping ended before its cap (nothing in training depends on the cap, no
    schedule) and a cap that reaches its last epoch. A run that hit its cap would go on under a larger one."""
    old, new, run = then.distill.epochs, cfg.distill.epochs, meta.get("epochs_run")
    return old == new or (isinstance(run, int) and run < old and run <= new)


def runs_in(folders: list[Path]) -> list[Path]:
    """Every run folder directly inside `folders` (e.g. a recipe search's `runs/`), sorted."""
    return sorted(run for folder in folders for run in Path(folder).glob("*") if run.is_dir())


def reuse(cfg: Config, data_fingerprint: str, also: list[Path] = (), num_items: int | None = None,
          pruned_ok: bool = False) -> bool:
    """True if a finished student for `cfg` is in place: its own folder is reusable, or a reusable one
    among `also` (e.g. the same settings' run from a hyper-parameter search) was copied there."""
    folder = Path(cfg.out_dir) / cfg.distill.name
    if reusable(folder, cfg, data_fingerprint, num_items, pruned_ok):
        return True
    for other in also:
        if reusable(other, cfg, data_fingerprint, num_items, pruned_ok):
            with atomic_dir(folder) as tmp:
                shutil.copytree(other, tmp, dirs_exist_ok=True)
            return True
    return False
