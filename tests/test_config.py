"""Configs: every shipped YAML loads; unknown keys and wrong types are errors; --set overrides."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import REPO

from llmkd.artifacts import LlmkdError
from llmkd.config import Config, apply_overrides, from_dict, load_config

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


def test_resolved_config_round_trips():
    cfg = load_config(REPO / "configs" / "ml100k.yaml", ["student.pooling=mean"])
    assert from_dict(Config, cfg.to_dict()) == cfg
    assert dataclasses.asdict(cfg) == cfg.to_dict()


@pytest.mark.parametrize("path", [p for p in SHIPPED if yaml.safe_load(p.read_text()).get("data", {}).get("source")
                                  == "files"], ids=lambda p: p.name)
def test_shipped_file_configs_build_their_data(path, monkeypatch):
    """Configs that bring their own files point at files that exist and load (paths relative to the repo).
    Benchmark data kept outside the repository (../shared/data/...) is checked where it is present."""
    from llmkd.data import build_data

    monkeypatch.chdir(REPO)
    cfg = load_config(path).data
    files = [(REPO / f).resolve() for f in (cfg.interactions, cfg.items)]
    outside = [f for f in files if not f.is_relative_to(REPO)]
    if outside and not all(f.is_file() for f in outside):
        pytest.skip(f"{path.name}: benchmark data outside the repository is not on this machine ({outside[0]})")
    data = build_data(cfg)
    assert data.num_users > 0 and data.num_items > 0 and len(data.eval_users("test")) > 0


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
