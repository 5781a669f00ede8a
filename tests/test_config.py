"""Configs: every shipped YAML loads; unknown keys and wrong types are errors; --set overrides."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml
from conftest import REPO

from llmkd.infra.artifacts import LlmkdError, write_json
from llmkd.infra.config import Config, apply_overrides, load_config

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert SHIPPED, "configs/*.yaml is empty"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # every key in the YAML is a field that the code consumes (nothing silently dropped)
    raw = yaml.safe_load(path.read_text())
    resolved = cfg.to_dict()
    for section, body in raw.items():
        if isinstance(body, dict):
            for key, value in body.items():
                assert resolved[section][key] == value, f"{section}.{key}"
        else:
            assert resolved[section] == body


def test_defaults_load():
    cfg = load_config(None)
    assert cfg == Config()


def write(tmp_path, obj) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(obj))
    return str(path)


def test_unknown_key_names_the_key(tmp_path):
    with pytest.raises(LlmkdError, match="alpah") as e:
        load_config(write(tmp_path, {"distill": {"alpah": 0.5}}))
    assert "distill" in str(e.value) and "cfg.yaml" in str(e.value)


def test_unknown_section_names_the_key(tmp_path):
    with pytest.raises(LlmkdError, match="trainer"):
        load_config(write(tmp_path, {"trainer": {"epochs": 3}}))


@pytest.mark.parametrize("raw, where", [
    ({"distill": {"epochs": "ten"}}, "distill.epochs"),
    ({"distill": {"epochs": 2.5}}, "distill.epochs"),
    ({"distill": {"epochs": True}}, "distill.epochs"),
    ({"student": {"use_user_id": "yes"}}, "student.use_user_id"),
    ({"eval": {"ks": 10}}, "eval.ks"),
    ({"eval": {"ks": [10, "twenty"]}}, "eval.ks[1]"),
    ({"out_dir": 3}, "out_dir"),
    ({"distill": 5}, "distill"),
])
def test_wrong_type(tmp_path, raw, where):
    with pytest.raises(LlmkdError) as e:
        load_config(write(tmp_path, raw))
    assert where in str(e.value)


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, {"distill": {"alpha": 1, "lr": 1}}))
    assert cfg.distill.alpha == 1.0 and isinstance(cfg.distill.alpha, float)


@pytest.mark.parametrize("raw, where", [
    ({"student": {"dim": 10, "num_heads": 3}}, "student.dim"),
    ({"distill": {"alpha": -1}}, "distill.alpha"),
    ({"index": {"type": "lsh"}}, "index.type"),
    ({"teacher": {"pooling": "cls"}}, "teacher.pooling"),
    ({"data": {"source": "ml-1m"}}, "data.source"),
    ({"eval": {"ks": []}}, "eval.ks"),
])
def test_invalid_values(tmp_path, raw, where):
    with pytest.raises(LlmkdError, match=where.replace(".", r"\.")):
        load_config(write(tmp_path, raw))


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [unclosed\n")
    with pytest.raises(LlmkdError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(LlmkdError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_in_load_config():
    cfg = load_config(REPO / "configs" / "ml100k.yaml", ["distill.alpha=0", "distill.name=student_no_kd",
                                                         "eval.ks=[5, 10]", "index.type=hnsw"])
    assert cfg.distill.alpha == 0.0 and isinstance(cfg.distill.alpha, float)
    assert cfg.distill.name == "student_no_kd"
    assert cfg.eval.ks == [5, 10]
    assert cfg.index.type == "hnsw"
    assert cfg.student.dim == load_config(REPO / "configs" / "ml100k.yaml").student.dim  # untouched


def test_apply_overrides_creates_sections_and_parses_yaml():
    raw = apply_overrides({}, ["distill.alpha=0.5", "data.interactions=a=b.csv", "distill.log_with=null"])
    assert raw == {"distill": {"alpha": 0.5, "log_with": None}, "data": {"interactions": "a=b.csv"}}


def test_override_errors():
    with pytest.raises(LlmkdError, match="KEY=VALUE"):
        load_config(None, ["distill.alpha"])
    with pytest.raises(LlmkdError, match="bogus"):
        load_config(None, ["distill.bogus=1"])
    with pytest.raises(LlmkdError, match="distill.epochs"):
        load_config(None, ["distill.epochs=many"])
    with pytest.raises(LlmkdError):
        load_config(None, ["out_dir.x=1"])  # out_dir is not a section
    with pytest.raises(LlmkdError, match=r"--set 'distill.kd_args=\{top_k: 5': invalid YAML value"):
        load_config(None, ["distill.kd_args={top_k: 5"])


def test_resolved_config_round_trips(tmp_path):
    """The resolved config as a run saves it (`resolved_config.json`, `write_json(cfg.to_dict())`) loads back
    through `load_config` as the same config, and a field edited in that file comes back edited."""
    cfg = load_config(REPO / "configs" / "ml100k.yaml", ["student.pooling=mean", "distill.alpha=0.3"])
    path = tmp_path / "resolved_config.json"
    write_json(path, cfg.to_dict())
    assert load_config(path) == cfg
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["distill"]["alpha"] = 0.7
    write_json(path, saved)
    assert load_config(path) == dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, alpha=0.7))


@pytest.mark.parametrize("path", [p for p in SHIPPED if yaml.safe_load(p.read_text()).get("data", {}).get("source")
                                  == "files"], ids=lambda p: p.name)
def test_shipped_file_configs_build_their_data(path, monkeypatch, tmp_path):
    """Configs that bring their own files point at files that exist and load (paths relative to the repo).
    Benchmark data kept outside the repository (../shared/data/...) is checked where it is present. Data a
    script generates under runs/ (synthetic_scale.yaml) is generated here, small, at the config's own relative
    paths under a scratch folder, so the config's data section (file names, text template) is read on a fresh clone."""
    from llmkd.data import build_data

    monkeypatch.chdir(REPO)
    cfg = load_config(path).data
    files = [(REPO / f).resolve() for f in (cfg.interactions, cfg.items)]
    outside = [f for f in files if not f.is_relative_to(REPO)]
    if outside and not all(f.is_file() for f in outside):
        pytest.skip(f"{path.name}: benchmark data outside the repository is not on this machine ({outside[0]})")
    generated = [f for f in files if f.is_relative_to(REPO / "runs")]
    if generated:
        from llmkd.data.synthetic import SyntheticSpec, write_synthetic

        assert path.name == "synthetic_scale.yaml", f"{path.name}: which script makes {generated[0]}?"
        folders = {f.parent for f in generated}
        assert len(folders) == 1, folders
        write_synthetic(SyntheticSpec(items=60, users=40, interactions=400), tmp_path / folders.pop().relative_to(REPO))
        monkeypatch.chdir(tmp_path)
        assert not any((tmp_path / f).resolve().is_relative_to(REPO) for f in (cfg.interactions, cfg.items))
    data = build_data(cfg)
    assert data.num_users > 0 and data.num_items > 0 and len(data.eval_users("test")) > 0
    readme = files[0].parent / "README.md"  # a benchmark folder that publishes its split's SHA-256 sums
    published = dict(re.findall(r"^- (valid|test)\s+`([0-9a-f]{64})`", readme.read_text(), re.M)) if readme.is_file() else {}
    assert published or path.name != "amazon_beauty.yaml", f"{readme}: no published split sums found"
    if published:
        from llmkd.data import split_checksums

        assert split_checksums(data) == published, f"{path.name}: the split differs from {readme}'s sums"


def test_kd_loss_is_checked_when_the_config_loads():
    from llmkd.losses import RelaxedRankingLoss

    cfg = load_config(None, ["distill.kd_loss=relaxed_ranking", "distill.kd_args={top_k: 5}"])
    loss = cfg.distill.make_kd_loss()
    assert isinstance(loss, RelaxedRankingLoss) and loss.top_k == 5
    assert cfg.distill.make_kd_loss().__class__.__name__ == "RelaxedRankingLoss"
    with pytest.raises(LlmkdError, match="unknown KD loss 'nope'.*listwise_kl"):
        load_config(None, ["distill.kd_loss=nope"])
    with pytest.raises(LlmkdError, match="unknown argument.*topk"):
        load_config(None, ["distill.kd_loss=infonce", "distill.kd_args={topk: 5}"])
    with pytest.raises(LlmkdError, match="distill.kd_args: expected a mapping"):
        load_config(None, ["distill.kd_args=[1, 2]"])


# ---------------------------------------------------------------- strict YAML and declared ranges


@pytest.mark.parametrize("text, key, lines", [
    ("distill:\n  alpha: 1.0\n  epochs: 2\n  alpha: 0.0\n", "distill.alpha", (4, 2)),
    ("distill:\n  alpha: 1.0\nstudent:\n  dim: 8\ndistill:\n  epochs: 2\n", "distill", (5, 1)),
    ("distill:\n  kd_args: {top_k: 5, top_k: 6}\n", "distill.kd_args.top_k", (2, 2)),
    ("out_dir: a\nout_dir: b\n", "out_dir", (2, 1)),
])
def test_duplicate_keys_are_rejected_with_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(LlmkdError) as e:
        load_config(path)
    assert f"dup.yaml: duplicate key '{key}' at line {lines[0]} (first at line {lines[1]})" in str(e.value)


def test_duplicate_keys_in_recipes_and_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("distill:\n  alpha: 0.5\n  alpha: 0.1\n")
    with pytest.raises(LlmkdError, match=r"recipe.yaml: duplicate key 'distill.alpha' at line 3 \(first at line 2\)"):
        load_config(None, recipe=recipe)
    with pytest.raises(LlmkdError, match=r"--set 'distill.kd_args=.*duplicate key 'top_k'"):
        load_config(None, ["distill.kd_args={top_k: 5, top_k: 6}"])


def numeric_fields() -> list[tuple[str, dataclasses.Field]]:
    """Every int / float (or list of them) field of every config section, as ('section.field', field)."""
    out = []
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            if str(f.type) in ("int", "float", "list[int]", "list[float]"):
                out.append((f"{section.name}.{f.name}", f))
    return out


def test_every_numeric_field_declares_its_range():
    """Ranges live where the field is declared (`bounded(...)` metadata), so none can be forgotten."""
    missing = [name for name, f in numeric_fields() if "bounds" not in f.metadata]
    assert len(numeric_fields()) > 40 and not missing, missing


@pytest.mark.parametrize("name", [name for name, _ in numeric_fields()])
def test_a_value_outside_the_declared_range_names_the_field(name):
    """Each numeric field refuses a value just outside its range (or NaN) with one error naming it."""
    field = dict(numeric_fields())[name]
    b = field.metadata["bounds"]
    value = b.gt if b.gt is not None else b.ge - 1 if b.ge is not None else b.lt if b.lt is not None else b.le + 1
    if str(field.type).startswith("list"):
        value = [value]
    with pytest.raises(LlmkdError, match=rf"{name.replace('.', '[.]')}(\[0\])?: expected"):
        load_config(None, [f"{name}={value}"])


def test_ranges_hold_when_a_section_is_built_in_code():
    from llmkd.infra.config import DistillConfig, StudentConfig

    with pytest.raises(LlmkdError, match=r"distill\.batch_size: expected >= 1, got 0"):
        DistillConfig(batch_size=0)
    with pytest.raises(LlmkdError, match=r"student\.num_heads: expected >= 1, got 0"):
        StudentConfig(num_heads=0)
    with pytest.raises(LlmkdError, match=r"distill\.lr: expected > 0, got nan"):
        DistillConfig(lr=float("nan"))


@pytest.mark.parametrize("overrides", [
    ["distill.kd_loss=infonce", "distill.kd_top_k=5", "distill.kd_args={positives: 6}"],
    ["distill.kd_loss=infonce", "distill.kd_top_k=1", "distill.kd_args={positives: 2}"],
])
def test_a_kd_term_that_vanishes_is_refused(overrides):
    """Settings under which the KD loss is 0 for any scores would train a no-teacher student while
    claiming KD: refused while the config loads (and accepted once alpha says there is no KD)."""
    with pytest.raises(LlmkdError, match="distill.kd_loss.*the KD term is 0 whatever the scores"):
        load_config(None, ["distill.alpha=1", *overrides])
    assert load_config(None, ["distill.alpha=0", *overrides]).distill.alpha == 0
    assert load_config(None, ["distill.alpha=1", *overrides[:2], "distill.kd_args={positives: 1}"])
