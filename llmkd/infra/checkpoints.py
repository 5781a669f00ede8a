"""Checkpoints of a distillation run: atomic save, exact restore, and which run a checkpoint belongs to.

A killed run resumes from `checkpoints/<name>/last` only when the checkpoint was made by the same run
(`same_run`): same training settings but for `RESUMABLE_CHANGES`, same data, same teacher cache.
`teacher_fingerprint` is defined in `llmkd.infra.lineage` (below this module and `llmkd.infra.reuse`) and
re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from accelerate import Accelerator

from llmkd.infra.artifacts import LlmkdError, reading, write_json
from llmkd.infra.config import Config, from_dict
from llmkd.infra.lineage import teacher_fingerprint
from llmkd.infra.reuse import training_key


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, state: dict) -> None:
    """Atomically replace `ckpt_dir/last`: weights, optimizer, RNG states and `train_state.json`
    (epoch, batches done in it, running loss, best so far), so a killed run resumes exactly."""
    tmp, last, old = ckpt_dir / "last.tmp", ckpt_dir / "last", ckpt_dir / "last.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "train_state.json", state)
        if last.exists():  # complete (it only ever appears by rename); a leftover `old` from a swap whose
            if old.exists():  # clean-up was killed is older still and would block the rename
                shutil.rmtree(old)
            last.rename(old)
        tmp.rename(last)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, ckpt_dir: Path, same_run=None) -> dict | None:
    """Restore the newest complete checkpoint (`last`, or `last.old` if a crash hit the swap). One whose
    train state `same_run(state)` rejects (other settings, data or teacher cache) is not restored: None."""
    for folder in (ckpt_dir / "last", ckpt_dir / "last.old"):
        if (folder / "train_state.json").is_file():
            with reading(folder, "training checkpoint"):
                state = json.loads((folder / "train_state.json").read_text())
                if same_run is not None and not same_run(state):
                    accelerator.print(f"{ckpt_dir}: checkpoint of a run with other settings, data or teacher "
                                      "cache; not resumed, training afresh")
                    return None
                accelerator.load_state(str(folder))
                return state
    return None


# Settings a run may change when it resumes: they decide when it stops, how often it saves, what it logs.
RESUMABLE_CHANGES = ("epochs", "patience", "checkpoint_every", "log_with", "eval_batch_size")


def run_identity(cfg: Config, data_fingerprint: str, num_items: int | None = None) -> dict:
    """What a checkpoint must match to be resumed: the training key (`llmkd.infra.reuse`) but for
    `RESUMABLE_CHANGES`, the data and the teacher cache."""
    training = training_key(cfg, num_items)
    training["distill"] = {k: v for k, v in training["distill"].items() if k not in RESUMABLE_CHANGES}
    teacher = Path(cfg.out_dir) / cfg.distill.teacher
    return {"training": training, "data": data_fingerprint,
            "teacher": teacher_fingerprint(teacher) if cfg.uses_teacher else None}


def run_record(cfg: Config, data_fingerprint: str) -> dict:
    """What a checkpoint stores to be recognised: its config, data and teacher cache fingerprints."""
    identity = run_identity(cfg, data_fingerprint)
    return {"run_config": cfg.to_dict(), "run_data": data_fingerprint, "run_teacher": identity["teacher"]}


def same_run(state: dict, cfg: Config, data_fingerprint: str, num_items: int | None = None) -> bool:
    """Whether a checkpoint's train state belongs to this run. Its stored config is read back through
    `from_dict`, so config fields added since it was written take their defaults (as `llmkd.infra.reuse` does):
    a new setting left at its default does not throw a half-trained run away. Checkpoints written before
    the config was stored carry a hash of `run_identity` instead."""
    if "run_config" not in state:
        legacy = run_identity(cfg, data_fingerprint)
        return state.get("run_key") == hashlib.sha256(json.dumps(legacy, sort_keys=True, default=str).encode()).hexdigest()[:16]
    try:
        then = from_dict(Config, {**state["run_config"], "out_dir": cfg.out_dir})
    except LlmkdError:
        return False
    now = run_identity(cfg, data_fingerprint, num_items)  # 'auto' settings as they resolve on this catalog
    return (run_identity(then, state["run_data"], num_items)["training"] == now["training"]
            and (state["run_data"], state["run_teacher"]) == (now["data"], now["teacher"]))
