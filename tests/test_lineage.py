"""Lineage: each artifact records the artifacts it was built from; a rebuilt input makes what follows
stale (checked along the whole chain), and a cache whose files do not load is rebuilt, never reused.

Stale artifacts through the real scripts are cases of the bad-input corpus (tests/test_bad_inputs.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from conftest import TEXT_TEMPLATE

from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.lineage import check_lineage, fingerprint


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic, tiny_bert):
    """data -> teacher -> student_kd (1 epoch) -> index on the synthetic data; (cfg, data)."""
    from llmkd.data import build_data, save_data
    from llmkd.distill import train
    from llmkd.evaluation.report import load_student
    from llmkd.index import build_index, save_index
    from llmkd.infra.config import Config, from_dict
    from llmkd.teacher import build_teacher_cache

    out = tmp_path_factory.mktemp("lineage") / "run"
    cfg = from_dict(Config, {
        "out_dir": str(out),
        "data": {"source": "files", "interactions": str(synthetic.interactions), "items": str(synthetic.items),
                 "text_template": TEXT_TEMPLATE, "max_history": 8},
        "teacher": {"model": str(tiny_bert), "batch_size": 16, "max_item_tokens": 16, "max_history_tokens": 64},
        "student": {"dim": 8, "num_layers": 1, "num_heads": 2, "dropout": 0.0},
        "distill": {"name": "student_kd", "alpha": 1.0, "kd_top_k": 5, "epochs": 1, "batch_size": 8}})
    data = build_data(cfg.data)
    save_data(data, out / "data", cfg.data)
    build_teacher_cache(data, cfg.teacher, out / "teacher")
    train(cfg)
    model = load_student(out / "student_kd", data)
    save_index(build_index(model.item_vectors().detach().numpy(), cfg.index), data.item_ids, out / "index",
               cfg.index, data.fingerprint, "student_kd")
    return cfg, data


def copy_run(run, tmp_path) -> Path:
    cfg, _ = run
    shutil.copytree(cfg.out_dir, tmp_path / "run")
    return tmp_path / "run"


def touch_meta(folder: Path) -> None:
    """What a rebuild does to an artifact's meta.json (new time stamps), its contents unchanged."""
    meta = json.loads((folder / "meta.json").read_text())
    meta["created"] = "2099-01-01T00:00:00+0000"
    (folder / "meta.json").write_text(json.dumps(meta))


def test_every_artifact_records_its_inputs(run):
    cfg, data = run
    out = Path(cfg.out_dir)
    student = json.loads((out / "student_kd" / "meta.json").read_text())
    index = json.loads((out / "index" / "meta.json").read_text())
    assert student["inputs"] == {"teacher": {"folder": "teacher", "fingerprint": fingerprint(out / "teacher")}}
    assert index["inputs"] == {"student": {"folder": "student_kd", "fingerprint": fingerprint(out / "student_kd")}}
    check_lineage(out / "index", out, data.fingerprint)  # nothing stale


def test_the_first_stale_folder_upstream_is_named(run, tmp_path):
    """Teacher rebuilt: the student is stale (and the index with it); the student is named, the one to
    rebuild first."""
    _, data = run
    out = copy_run(run, tmp_path)
    touch_meta(out / "teacher")
    with pytest.raises(LlmkdError) as e:
        check_lineage(out / "index", out, data.fingerprint)
    assert str(e.value) == (f"{out / 'student_kd'}: stale, built from {out / 'teacher'} before that teacher was "
                            "rebuilt; rebuild it: accelerate launch scripts/distill.py --config <config> "
                            "--set distill.name=student_kd")


def test_a_retrained_student_makes_its_index_stale(run, tmp_path):
    _, data = run
    out = copy_run(run, tmp_path)
    touch_meta(out / "student_kd")
    check_lineage(out / "student_kd", out, data.fingerprint)
    with pytest.raises(LlmkdError, match=r"index: stale, .* rebuild it: python scripts/build_index.py --config "
                                         r"<config> --student student_kd$"):
        check_lineage(out / "index", out, data.fingerprint)


def test_a_truncated_teacher_cache_is_rebuilt_not_reused(run, tmp_path):
    from llmkd.teacher import TeacherCache, build_teacher_cache

    cfg, data = run
    out = copy_run(run, tmp_path)
    assert build_teacher_cache(data, cfg.teacher, out / "teacher")["reused"]
    path = out / "teacher" / "embeddings.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not build_teacher_cache(data, cfg.teacher, out / "teacher")["reused"]
    TeacherCache(out / "teacher", data)  # loads


@pytest.mark.parametrize("broken", ["model.safetensors", "config.json", "meta.json"])
def test_a_student_whose_files_do_not_load_is_not_reused(run, tmp_path, broken):
    from llmkd.infra.reuse import reusable

    cfg, data = run
    out = copy_run(run, tmp_path)
    cfg = dataclasses.replace(cfg, out_dir=str(out))
    assert reusable(out / "student_kd", cfg, data.fingerprint)
    path = out / "student_kd" / broken
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not reusable(out / "student_kd", cfg, data.fingerprint)


def test_a_truncated_adapter_is_tuned_again_not_reused(tmp_path, synthetic_data, tiny_bert):
    from llmkd.infra.config import Config, FinetuneConfig, TeacherConfig
    from llmkd.teacher.finetune import finetune_teacher

    cfg = Config(out_dir=str(tmp_path), teacher=TeacherConfig(model=str(tiny_bert), batch_size=8, max_history_items=5,
                                                              max_history_tokens=64),
                 finetune=FinetuneConfig(steps=1, eval_every=1, batch_size=4, catalog_negatives=8))
    assert finetune_teacher(synthetic_data, cfg)["reused"] is False
    path = tmp_path / "teacher_lora" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    assert finetune_teacher(synthetic_data, cfg)["reused"] is False
    assert finetune_teacher(synthetic_data, cfg)["reused"] is True


def test_a_student_from_before_loss_auto_is_reused_where_auto_resolves_to_its_loss(run, tmp_path):
    """Students trained before `distill.loss: auto` record 'full_softmax' (then the default) and no
    `sampled_above` / `kd_index`; on a small catalog 'auto' trains exactly that, so they are reused, and
    a run that asks for the sampled softmax is not."""
    from llmkd.infra.reuse import reusable

    cfg, data = run
    out = copy_run(run, tmp_path)
    cfg = dataclasses.replace(cfg, out_dir=str(out))
    meta_path = out / "student_kd" / "meta.json"
    meta = json.loads(meta_path.read_text())
    old = meta["config"]["distill"]
    old["loss"] = "full_softmax"
    for new_field in ("sampled_above", "kd_index", "kd_nprobe", "kd_exact_max_items"):
        old.pop(new_field, None)
    meta_path.write_text(json.dumps(meta))
    assert cfg.distill.loss == "auto" and data.num_items <= cfg.distill.sampled_above
    assert reusable(out / "student_kd", cfg, data.fingerprint, data.num_items)
    sampled = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, loss="sampled_softmax"))
    assert not reusable(out / "student_kd", sampled, data.fingerprint, data.num_items)


def test_a_checkpoint_from_before_loss_auto_resumes_where_auto_resolves_to_its_loss(run):
    """The same rule for a half-trained run's checkpoint (`llmkd.infra.checkpoints.same_run`)."""
    from llmkd.infra.checkpoints import run_record, same_run

    cfg, data = run
    old = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, loss="full_softmax"))
    state = run_record(old, data.fingerprint)
    for new_field in ("sampled_above", "kd_index", "kd_nprobe", "kd_exact_max_items"):
        state["run_config"]["distill"].pop(new_field, None)
    assert same_run(state, cfg, data.fingerprint, data.num_items)
    sampled = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, loss="sampled_softmax"))
    assert not same_run(state, sampled, data.fingerprint, data.num_items)
    assert not same_run(state, cfg, data.fingerprint)  # without the catalog size 'auto' is not 'full_softmax'


@pytest.mark.parametrize("cap, run_epochs, asked, reused", [
    (10, 4, 20, True),    # early stopping ended it at epoch 4 of 10: a cap of 20 trains the same run
    (10, 4, 4, True),     # ... and so does a cap that reaches its last epoch
    (10, 4, 3, False),    # a cap below its last epoch would stop sooner
    (10, 10, 20, False),  # it hit its cap: a larger cap would train on
])
def test_a_run_that_stopped_early_stands_for_a_larger_epoch_cap(run, tmp_path, cap, run_epochs, asked, reused):
    from llmkd.infra.reuse import reusable

    cfg, data = run
    out = copy_run(run, tmp_path)
    meta_path = out / "student_kd" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["distill"]["epochs"], meta["epochs_run"] = cap, run_epochs
    meta_path.write_text(json.dumps(meta))
    cfg = dataclasses.replace(cfg, out_dir=str(out), distill=dataclasses.replace(cfg.distill, epochs=asked))
    assert reusable(out / "student_kd", cfg, data.fingerprint, data.num_items) is reused
