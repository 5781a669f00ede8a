"""Malformed inputs through the real scripts: exit 2, one `error:` line naming the culprit, nothing written.

Every file in `tests/bad_inputs/` is one broken input (or, for `ok_*`, the well-formed half of a pair).
Each case runs a script as a subprocess and checks that it

- exits with status 2 (`llmkd.commands.cli.run`'s user-error status),
- prints exactly one line to stderr, `error: ...`, naming the file or config key and what is wrong,
- prints no traceback, and
- writes nothing: the stage's artifact folder does not appear and no `.tmp-` sibling is left.

Data and config cases need no model. Cases about broken artifacts (a truncated student, FAISS index or
teacher cache, a teacher cache made from other data, a missing teacher model) start from one tiny
pipeline built once for the module (tiny BERT teacher, 1-epoch dim-8 student), copied and broken per case.
Each case runs the script's own code in-process (`llmkd.commands.run_in_process`: the script as `__main__`
with its argv, stdout and stderr captured, warnings printed as the interpreter would, an uncaught exception
recorded as a traceback), so the corpus does not pay a torch / transformers import per case. One case per
script (`SUBPROCESS`) runs as a real subprocess instead, checking the same contract where nothing is already
imported or configured: exit status 2 and a stderr of exactly one line as a user sees them.

Inputs that are *not* errors are pinned by the `test_policy_*` tests at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, run_in_process

BAD = REPO / "tests" / "bad_inputs"
TEMPLATE = "{title} | {genre}"
OK_INTER, OK_ITEMS = BAD / "ok_interactions.csv", BAD / "ok_items.csv"
WORKERS = 2
HUGE_WORDS = 100_000
"""Words in the enormous item title of the pipeline fixture (600 kB: over the csv module's field limit)."""


# ---------------------------------------------------------------- running scripts


def env(home: Path) -> dict[str, str]:
    """Offline, one thread, an empty HF_HOME (no accelerate default config)."""
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             HF_HOME=str(home), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return e


def run_script(script: str, cfg: Path, *extra: str, home: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "scripts" / script), "--config", str(cfg), *extra]
    return subprocess.run(args, cwd=REPO, env=env(home), capture_output=True, text=True, timeout=180, check=False)


def run_script_in_process(script: str, cfg: Path, *extra: str, home: Path) -> subprocess.CompletedProcess:
    """`run_script` in this interpreter (conftest.run_in_process: output captured, warnings printed)."""
    return run_in_process(REPO / "scripts" / script, ["--config", str(cfg), *extra], env(home))


def base_config(out_dir: Path, interactions: Path = OK_INTER, items: Path = OK_ITEMS, teacher: str = "minilm") -> dict:
    """A complete tiny run config; cases replace one part of it."""
    return {
        "out_dir": str(out_dir),
        "data": {"source": "files", "interactions": str(interactions), "items": str(items),
                 "text_template": TEMPLATE, "max_history": 10},
        "teacher": {"model": teacher, "batch_size": 16, "max_item_tokens": 16, "max_history_tokens": 64},
        "student": {"dim": 8, "num_layers": 1, "num_heads": 2, "dropout": 0.0},
        "distill": {"name": "student_kd", "alpha": 1.0, "kd_top_k": 5, "epochs": 1, "batch_size": 8},
        "index": {"type": "flat"},
        "eval": {"ks": [1, 5], "students": ["student_kd"], "bootstrap": 10},
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the tiny pipeline


@dataclass(frozen=True)
class Pipeline:
    """A finished run (`run/`: data, teacher, student_kd, index), a teacher cache of other data, and two
    students trained after the index was built (`run/student_retrained`: the same settings, another seed;
    `run/student_dim16`: another dimension), to stand for a student_kd retrained since."""

    root: Path
    run: Path
    cfg: dict
    other_teacher: Path
    teacher_model: Path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_bert) -> Pipeline:
    """data -> teacher -> distill (1 epoch, dim 8) -> index on the `ok_*` files, one title 600 kB long."""
    from llmkd.data import build_data, save_data
    from llmkd.distill import train
    from llmkd.evaluation.report import load_student
    from llmkd.index import build_index, save_index
    from llmkd.infra.config import Config, from_dict
    from llmkd.teacher import build_teacher_cache

    root = tmp_path_factory.mktemp("bad_inputs_pipeline")
    huge = root / "items_huge_title.csv"
    lines = OK_ITEMS.read_text(encoding="utf-8").splitlines()
    lines[1] = "101," + " ".join(["oscar"] * HUGE_WORDS) + ",drama"  # the first data row: csv's field limit
    huge.write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = base_config(root / "run", items=huge, teacher=str(tiny_bert))
    cfg = from_dict(Config, raw)
    run = Path(cfg.out_dir)
    data = build_data(cfg.data)
    save_data(data, run / "data", cfg.data)
    build_teacher_cache(data, cfg.teacher, run / "teacher")
    train(cfg)
    model = load_student(run / "student_kd", data)
    index = build_index(model.item_vectors().detach().numpy(), cfg.index)
    save_index(index, data.item_ids, run / "index", cfg.index, data.fingerprint, "student_kd")
    for name, more in (("student_retrained", {"seed": 1}), ("student_dim16", {})):
        again = json.loads(json.dumps(raw))
        again["distill"].update(name=name, **more)
        again["student"]["dim"] = 16 if name == "student_dim16" else again["student"]["dim"]
        train(from_dict(Config, again))
    other = from_dict(Config, base_config(root / "other", interactions=BAD / "inter_short_users.csv",
                                          teacher=str(tiny_bert)))
    build_teacher_cache(build_data(other.data), other.teacher, root / "other" / "teacher")
    return Pipeline(root, run, raw, root / "other" / "teacher", tiny_bert)


# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One broken input: which script meets it, what the error must say, which artifact must not appear."""

    id: str
    script: str
    names: str
    """The file or config key the error line must name."""
    expect: str
    """What is wrong, as a substring of the error line."""
    output: str
    """The artifact folder (under out_dir) the script would have written."""
    setup: Callable[[Path, Pipeline | None], tuple[Path, list[str]]]
    """(case folder, pipeline) -> (config file, extra arguments); the run goes to `<case folder>/run`."""
    needs_pipeline: bool = False


def write_parquet(rows: dict[str, list]) -> Callable[[Path], None]:
    """A writer of a Parquet file with these columns (pyarrow infers list and struct types)."""
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(rows), path)

    return write


# Made at test time rather than committed: binary files that depend on the library writing them.
GENERATED: dict[str, Callable[[Path], None]] = {
    "inter_not_parquet.parquet": lambda path: path.write_bytes(b"PAR1 this is not really parquet\n"),
    "inter_list_user.parquet": write_parquet({"user_id": [[1], [1, 2], [1]], "item_id": [101, 102, 103],
                                              "timestamp": [1000, 1001, 1002]}),
    "inter_struct_timestamp.parquet": write_parquet({"user_id": [1, 1, 1], "item_id": [101, 102, 103],
                                                     "timestamp": [{"s": 1000}, {"s": 1001}, {"s": 1002}]}),
}


def data_case(file: str, expect: str) -> Case:
    """A broken interactions (`inter_*`) or items (`items_*`) file, paired with the well-formed other half."""
    def setup(tmp: Path, _: Pipeline | None) -> tuple[Path, list[str]]:
        bad = BAD / file
        if file in GENERATED:
            bad = tmp / file
            GENERATED[file](bad)
        inter, items = (bad, OK_ITEMS) if file.startswith("inter_") else (OK_INTER, bad)
        return write_yaml(tmp / "cfg.yaml", base_config(tmp / "run", inter, items)), []

    return Case(file, "prepare_data.py", file, expect, "data", setup)


def config_case(file: str, names: str, expect: str, script: str = "prepare_data.py", output: str = "data") -> Case:
    """A committed YAML config, used as is (only out_dir is overridden)."""
    def setup(tmp: Path, _: Pipeline | None) -> tuple[Path, list[str]]:
        return BAD / file, ["--set", f"out_dir={tmp / 'run'}"]

    return Case(file, script, names, expect, output, setup)


def artifact_case(case_id: str, script: str, names: str, expect: str, output: str,
                  keep: tuple[str, ...], break_it: Callable[[Path, Pipeline], dict | None] = lambda run, p: None,
                  **overrides: str) -> Case:
    """Copy the pipeline's `keep` folders into a fresh run, break one thing, run `script`.

    `break_it(run, pipeline)` may return more config overrides ({"section.field": value}).
    """
    def setup(tmp: Path, p: Pipeline | None) -> tuple[Path, list[str]]:
        assert p is not None
        run = tmp / "run"
        for name in keep:
            shutil.copytree(p.run / name, run / name)
        more = break_it(run, p) or {}
        cfg = json.loads(json.dumps(p.cfg))
        cfg["out_dir"] = str(run)
        for key, value in {**overrides, **more}.items():
            section, field = key.split(".")
            cfg[section][field] = value
        return write_yaml(tmp / "cfg.yaml", cfg), []

    return Case(case_id, script, names, expect, output, setup, needs_pipeline=True)


def path_case(case_id: str, names: str, expect: str, make: Callable[[Path], tuple[dict, list[str]]],
              script: str = "prepare_data.py", output: str = "data") -> Case:
    """A path of the wrong kind (a folder where a file is expected, an unreadable file, ...).

    `make(case folder)` builds it and returns config overrides ({"out_dir" or "section.field": value})
    and extra arguments."""
    def setup(tmp: Path, _: Pipeline | None) -> tuple[Path, list[str]]:
        overrides, extra = make(tmp)
        cfg = base_config(tmp / "run")
        for key, value in overrides.items():
            section, _, name = key.rpartition(".")
            (cfg[section] if section else cfg)[name] = value
        return write_yaml(tmp / "cfg.yaml", cfg), extra

    return Case(case_id, script, names, expect, output, setup)


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def socket_file(path: Path) -> Path:
    """A Unix socket: it exists, but opening it fails (ENXIO), even for root."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    return path


def plain_file(path: Path) -> Path:
    path.write_text("not a folder\n", encoding="utf-8")
    return path


def no_eval_users_case(script: str, output: str) -> Case:
    """Data where no user has 3 interactions (prepared in-process: that stage only warns): every later
    stage stops with one line instead of crashing on an empty valid or test split."""
    def setup(tmp: Path, _: Pipeline | None) -> tuple[Path, list[str]]:
        from llmkd.data import build_data, save_data
        from llmkd.infra.config import Config, from_dict

        raw = base_config(tmp / "run", interactions=BAD / "inter_no_eval_users.csv")
        cfg = from_dict(Config, raw)
        save_data(build_data(cfg.data), tmp / "run" / "data", cfg.data)
        return write_yaml(tmp / "cfg.yaml", raw), []

    return Case(f"no_eval_users_{script.removesuffix('.py')}", script, "run/data",
                "no user has 3 or more interactions", output, setup)


def snapshot(folder: Path) -> set[str]:
    """Every path under `folder`, relative (empty when it does not exist)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def retrained_student(name: str) -> Callable[[Path, Pipeline], None]:
    """student_kd replaced by a student trained after the index was built (`Pipeline`)."""
    def break_it(run: Path, p: Pipeline) -> None:
        shutil.rmtree(run / "student_kd")
        shutil.copytree(p.run / name, run / "student_kd")

    return break_it


def legacy_index_of_student_with_other_dim(run: Path, p: Pipeline) -> None:
    """student_kd retrained with another dimension under an index made before lineage was recorded."""
    retrained_student("student_dim16")(run, p)
    meta = json.loads((run / "index" / "meta.json").read_text())
    del meta["inputs"]
    (run / "index" / "meta.json").write_text(json.dumps(meta))


def rebuilt_teacher(run: Path, p: Pipeline) -> None:
    """The teacher cache rebuilt after student_kd was trained (a rebuild writes a new meta.json)."""
    meta = json.loads((run / "teacher" / "meta.json").read_text())
    meta["created"] = "2099-01-01T00:00:00+0000"
    (run / "teacher" / "meta.json").write_text(json.dumps(meta))


def other_teacher(run: Path, p: Pipeline) -> None:
    shutil.copytree(p.other_teacher, run / "teacher")


def truncated_teacher_model(run: Path, p: Pipeline) -> dict:
    model = run.parent / "model"
    shutil.copytree(p.teacher_model, model)
    truncate(model / "model.safetensors")
    return {"teacher.model": str(model)}


CASES = [
    # interactions files
    data_case("inter_semicolon.csv", "wrong delimiter?"),
    data_case("inter_no_header.csv", "no header row?"),
    data_case("inter_missing_timestamp_column.csv", "missing column(s) ['timestamp']"),
    data_case("inter_repeated_header.csv", "repeated column names"),
    data_case("inter_nan_user.csv", "row 2: field 'user_id' is 'NaN'; expected an id"),
    data_case("inter_empty_item_id.csv", "row 3: field 'item_id' is ''; expected an id"),
    data_case("inter_text_timestamp.csv", "row 2: field 'timestamp' is '2021-03-04T10:00:00'; expected a number"),
    data_case("inter_nan_timestamp.csv", "row 2: field 'timestamp' is 'nan'; expected a number"),
    data_case("inter_inf_timestamp.csv", "row 2: field 'timestamp' is 'inf'; expected a number"),
    data_case("inter_unknown_item.csv", "row 2: item_id '999' is not in the items file"),
    data_case("inter_empty.csv", "empty file"),
    data_case("inter_header_only.csv", "no data rows after the header"),
    data_case("inter_ragged_row.csv", "Expected 3 fields in line 3, saw 4"),
    data_case("inter_truncated.jsonl", "could not be parsed as .jsonl"),
    data_case("inter_not_parquet.parquet", "could not be parsed as .parquet"),
    data_case("inter_unsupported.xlsx", "unsupported format '.xlsx'"),
    data_case("inter_nested_user.jsonl", "row 2: field 'user_id' is a nested object"),
    data_case("inter_list_item.jsonl", "row 1: field 'item_id' is a list"),
    data_case("inter_list_user.parquet", "row 1: field 'user_id' is a list"),
    data_case("inter_nested_timestamp.jsonl", "row 1: field 'timestamp' is a nested object"),
    data_case("inter_struct_timestamp.parquet", "row 1: field 'timestamp' is a nested object"),
    data_case("inter_word_timestamp.csv", "row 2: field 'timestamp' is 'yesterday'; expected an ISO-8601 date-time"),
    # items files
    data_case("items_duplicate_id.csv", "row 3: duplicate item_id '101'"),
    data_case("items_empty_text.csv", "row 2 (item_id 102): empty item text"),
    data_case("items_latin1.csv", "not UTF-8 text (byte 0xe9)"),
    data_case("items_missing_id_column.csv", "missing column(s) ['item_id']"),
    data_case("items_missing_template_column.csv", "missing column(s) ['genre']"),
    # configs
    config_case("config_unknown_key.yaml", "distill", "unknown key(s) ['learning_rate']"),
    config_case("config_wrong_type.yaml", "distill.epochs", "expected int, got str '3'"),
    config_case("config_bad_choice.yaml", "index.type", "expected 'flat', 'hnsw', 'ivf' or 'ivfpq', got 'annoy'"),
    config_case("config_kd_top_k_zero.yaml", "distill.kd_top_k", "expected >= 1, got 0",
                script="distill.py", output="student_kd"),
    config_case("config_invalid_yaml.yaml", "config_invalid_yaml.yaml", "invalid YAML"),
    config_case("config_top_level_list.yaml", "config_top_level_list.yaml", "expected a mapping at the top level"),
    config_case("config_files_without_items.yaml", "data.items", "needs both data.interactions and data.items"),
    config_case("config_duplicate_key.yaml", "config_duplicate_key.yaml",
                "duplicate key 'distill.alpha' at line 5 (first at line 3)"),
    config_case("config_duplicate_section.yaml", "config_duplicate_section.yaml",
                "duplicate key 'distill' at line 6 (first at line 2)"),
    config_case("config_batch_size_zero.yaml", "distill.batch_size", "expected >= 1, got 0",
                script="distill.py", output="student_kd"),
    config_case("config_num_heads_zero.yaml", "student.num_heads", "expected >= 1, got 0"),
    config_case("config_lr_negative.yaml", "distill.lr", "expected > 0, got -0.001"),
    config_case("config_lr_nan.yaml", "distill.lr", "expected > 0, got nan"),
    config_case("config_finetune_lr_zero.yaml", "finetune.lr", "expected > 0, got 0.0",
                script="finetune_teacher.py", output="teacher_lora"),
    config_case("config_teacher_batch_size_zero.yaml", "teacher.batch_size", "expected >= 1, got 0",
                script="build_teacher.py", output="teacher"),
    config_case("config_max_item_tokens_zero.yaml", "teacher.max_item_tokens", "expected >= 1, got 0"),
    config_case("config_dropout_one.yaml", "student.dropout", "expected >= 0 and < 1, got 1.0"),
    config_case("config_patience_zero.yaml", "distill.patience", "expected >= 1, got 0"),
    config_case("config_bootstrap_zero.yaml", "eval.bootstrap", "expected >= 1, got 0",
                script="evaluate.py", output="eval"),
    config_case("config_ivf_nlist_zero.yaml", "index.ivf_nlist", "expected >= 1, got 0",
                script="build_index.py", output="index"),
    config_case("config_teacher_scale_zero.yaml", "distill.teacher_scale", "expected > 0, got 0.0",
                script="distill.py", output="student_kd"),
    config_case("config_kd_term_vanishes.yaml", "distill.kd_loss", "the KD term is 0 whatever the scores",
                script="distill.py", output="student_kd"),
    # paths of the wrong kind
    path_case("interactions_is_a_folder", "interactions.csv", "is a folder; expected a file",
              lambda tmp: ({"data.interactions": str(folder(tmp / "interactions.csv"))}, [])),
    path_case("items_unreadable", "items.csv", "cannot be read",
              lambda tmp: ({"data.items": str(socket_file(tmp / "items.csv"))}, [])),
    path_case("out_dir_is_a_file", "out_dir", "is a file; expected a folder",
              lambda tmp: ({"out_dir": str(plain_file(tmp / "run"))}, [])),
    path_case("out_dir_under_a_file", "afile", "is a file; expected a folder",
              lambda tmp: ({"out_dir": str(plain_file(tmp / "afile") / "run")}, [])),
    path_case("config_is_a_folder", "conf.yaml", "is a folder; expected a config file",
              lambda tmp: ({}, ["--config", str(folder(tmp / "conf.yaml"))])),
    path_case("recipe_is_a_folder", "recipe.yaml", "is a folder; expected a recipe file",
              lambda tmp: ({}, ["--recipe", str(folder(tmp / "recipe.yaml"))]),
              script="distill.py", output="student_kd"),
    # data where no user can be evaluated: every stage after the data stage refuses it
    no_eval_users_case("build_teacher.py", "teacher"),
    no_eval_users_case("finetune_teacher.py", "teacher_lora"),
    no_eval_users_case("distill.py", "student_kd"),
    no_eval_users_case("evaluate.py", "eval"),
    # artifacts and models
    artifact_case("teacher_model_missing", "build_teacher.py", "no_such_model", "does not exist", "teacher",
                  keep=("data",), **{"teacher.model": str(BAD / "no_such_model")}),
    artifact_case("teacher_model_broken_config", "build_teacher.py", "model_broken_config", "could not load a HF model",
                  "teacher", keep=("data",), **{"teacher.model": str(BAD / "model_broken_config")}),
    artifact_case("teacher_model_weights_truncated", "build_teacher.py", "teacher.model",
                  "could not load a HF model (Error while deserializing header", "teacher", keep=("data",),
                  break_it=truncated_teacher_model),
    artifact_case("data_artifact_missing", "build_teacher.py", "data", "not a data artifact", "teacher", keep=()),
    artifact_case("data_split_truncated", "build_teacher.py", "split.safetensors", "unreadable data split", "teacher",
                  keep=("data",), break_it=lambda run, p: truncate(run / "data" / "split.safetensors")),
    artifact_case("student_weights_truncated", "build_index.py", "model.safetensors", "unreadable student weights",
                  "index", keep=("data", "student_kd"),
                  break_it=lambda run, p: truncate(run / "student_kd" / "model.safetensors")),
    artifact_case("faiss_index_truncated", "evaluate.py", "faiss.index", "unreadable FAISS index", "eval",
                  keep=("data", "teacher", "student_kd", "index"),
                  break_it=lambda run, p: truncate(run / "index" / "faiss.index")),
    artifact_case("teacher_cache_truncated", "distill.py", "embeddings.safetensors", "unreadable teacher cache",
                  "student_new", keep=("data", "teacher"), **{"distill.name": "student_new"},
                  break_it=lambda run, p: truncate(run / "teacher" / "embeddings.safetensors")),
    artifact_case("teacher_cache_of_other_data", "distill.py", "teacher", "made from other data", "student_new",
                  keep=("data",), break_it=other_teacher, **{"distill.name": "student_new"}),
    # stale artifacts: an input was rebuilt after them
    artifact_case("index_of_retrained_student", "evaluate.py", "/index: stale, built from",
                  "rebuild it: python scripts/build_index.py --config <config> --student student_kd", "eval",
                  keep=("data", "teacher", "student_kd", "index"), break_it=retrained_student("student_retrained")),
    artifact_case("index_of_student_with_other_dim", "evaluate.py", "/index: stale, built from",
                  "rebuild it: python scripts/build_index.py", "eval",
                  keep=("data", "teacher", "student_kd", "index"), break_it=retrained_student("student_dim16")),
    artifact_case("legacy_index_of_student_with_other_dim", "evaluate.py", "/index: stale, 8-d vectors",
                  "student student_kd has 16; rebuild it: python scripts/build_index.py", "eval",
                  keep=("data", "teacher", "student_kd", "index"), break_it=legacy_index_of_student_with_other_dim),
    artifact_case("student_of_rebuilt_teacher", "build_index.py", "/student_kd: stale, built from",
                  "rebuild it: accelerate launch scripts/distill.py --config <config> --set distill.name=student_kd",
                  "index", keep=("data", "teacher", "student_kd"), break_it=rebuilt_teacher),
    artifact_case("eval_of_student_of_rebuilt_teacher", "evaluate.py", "/student_kd: stale, built from",
                  "before that teacher was rebuilt", "eval", keep=("data", "teacher", "student_kd", "index"),
                  break_it=rebuilt_teacher),
]


SUBPROCESS = {
    "prepare_data.py": "inter_semicolon.csv",
    "finetune_teacher.py": "no_eval_users_finetune_teacher",
    "build_teacher.py": "teacher_model_weights_truncated",
    "distill.py": "teacher_cache_truncated",
    "build_index.py": "student_weights_truncated",
    "evaluate.py": "faiss_index_truncated",
}
"""The one case per script that runs as a real subprocess (one that gets past the imports and the config)."""


@pytest.fixture(scope="module")
def results(request, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, set[str]]]:
    """Run every selected case: the `SUBPROCESS` ones in a thread pool while the others run in-process, data
    and config cases before the pipeline is built.

    {id: (process, out_dir, the paths under out_dir before the run)}.
    """
    module = request.node
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is module.obj and hasattr(item, "callspec") and "case" in item.callspec.params}
    root = tmp_path_factory.mktemp("bad_input_runs")
    home = root / "hf_home"
    futures: dict[str, Future] = {}
    done: dict[str, tuple[subprocess.CompletedProcess, Path, set[str]]] = {}

    def start(pool: ThreadPoolExecutor, case: Case, p: Pipeline | None) -> None:
        tmp = root / case.id
        tmp.mkdir()
        cfg, extra = case.setup(tmp, p)
        before = snapshot(tmp / "run")
        if SUBPROCESS[case.script] == case.id:
            futures[case.id] = pool.submit(lambda: (run_script(case.script, cfg, *extra, home=home), tmp / "run",
                                                    before))
        else:
            done[case.id] = (run_script_in_process(case.script, cfg, *extra, home=home), tmp / "run", before)

    with ThreadPoolExecutor(WORKERS) as pool:
        todo = sorted((c for c in CASES if c.id in selected), key=lambda c: SUBPROCESS[c.script] != c.id)
        for case in todo:
            if not case.needs_pipeline:
                start(pool, case, None)
        if any(c.needs_pipeline for c in todo):
            p = request.getfixturevalue("pipeline")
            for case in todo:
                if case.needs_pipeline:
                    start(pool, case, p)
        return {**done, **{k: f.result() for k, f in futures.items()}}


def test_every_script_has_one_case_in_a_real_subprocess():
    """The exit-2 contract is also checked where nothing is imported yet, once per script of the corpus."""
    by_id = {c.id: c for c in CASES}
    assert set(SUBPROCESS) == {c.script for c in CASES}
    assert all(by_id[case].script == script for script, case in SUBPROCESS.items())


def test_corpus_is_covered():
    """Every committed bad input is a case here or a documented policy below; no case names a missing file."""
    files = {p.name for p in BAD.iterdir()}
    used = {c.id for c in CASES} | {"model_broken_config"}
    policies = {"ok_interactions.csv", "ok_items.csv", "inter_negative_timestamps.csv", "inter_duplicate_rows.csv",
                "inter_short_users.csv", "inter_no_eval_users.csv", "README.md"}
    assert files - used - policies == set()
    named_after_files = {c.id for c in CASES if c.id.endswith((".csv", ".tsv", ".jsonl", ".parquet", ".xlsx", ".yaml"))}
    assert named_after_files - set(GENERATED) <= files
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, results):
    proc, out, before = results[case.id]
    lines = proc.stderr.splitlines()
    context = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, context
    assert proc.returncode == 2, context
    assert len(lines) == 1 and lines[0].startswith("error: "), context
    assert case.names in lines[0], context
    assert case.expect in lines[0], context
    assert not (out / case.output).exists(), f"{case.output} was written"
    leftovers = list(out.glob(".*.tmp-*")) if out.exists() else []
    assert not leftovers, leftovers
    assert snapshot(out) == before, "the failed run wrote files"


# ---------------------------------------------------------------- policies: inputs that are not errors


def prepare(interactions: Path):
    """`RecData` of `interactions` + ok_items.csv (in-process: the data stage's library call)."""
    from llmkd.data import build_data
    from llmkd.infra.config import DataConfig

    return build_data(DataConfig(source="files", interactions=str(interactions), items=str(OK_ITEMS),
                                 text_template=TEMPLATE))


def split_by_user(data) -> dict[str, tuple[list[str], str | None, str | None]]:
    out = {}
    for u, uid in enumerate(data.user_ids):
        v, t = int(data.valid_item[u]), int(data.test_item[u])
        out[uid] = ([data.item_ids[i] for i in data.train[u]], data.item_ids[v] if v >= 0 else None,
                    data.item_ids[t] if t >= 0 else None)
    return out


def test_policy_negative_timestamps_are_numbers():
    """Negative timestamps are accepted: a timestamp is any finite number and only orders a user's rows.

    They sort as numbers: -30 < -20 < -10 < 0 (as text, '-10' would come first) and -1000000 < -5 < 7.
    """
    data = prepare(BAD / "inter_negative_timestamps.csv")
    assert split_by_user(data) == {"1": (["101", "102"], "103", "104"), "2": (["105"], "101", "106")}


def test_policy_duplicate_rows_are_repeated_interactions():
    """Repeated (user, item, timestamp) rows are kept, each one an interaction (docs/your-data.md).

    So one item can be both a user's valid and test item. Evaluation masks the test history
    (train + valid), which then holds the test item too: it ranks below every unseen item.
    """
    data = prepare(BAD / "inter_duplicate_rows.csv")
    assert split_by_user(data) == {"1": (["101", "102", "102"], "103", "103")}


def test_policy_short_users_are_train_only():
    """Users with one or two interactions are kept for training only: no valid, no test item."""
    data = prepare(BAD / "inter_short_users.csv")
    assert split_by_user(data) == {"1": (["101"], None, None), "2": (["102", "103"], None, None),
                                   "3": (["104"], "105", "106")}
    assert list(data.eval_users("test")) == [2]


def test_policy_enormous_item_text_is_truncated(pipeline, tiny_bert):
    """A 600 kB item title is no error: `data/` keeps it whole, the teacher reads its first
    `teacher.max_item_tokens` tokens (and a history its most recent `max_history_tokens`).

    The title is in the first data row, which the CSV header check also reads: over the csv module's
    131072-character field limit, which must not stop the run.
    """
    from llmkd.data import load_data
    from llmkd.teacher import TeacherCache, TextEncoder

    data = load_data(pipeline.run / "data")
    assert data.item_texts[0] == " ".join(["oscar"] * HUGE_WORDS) + " | drama"
    cache = TeacherCache(pipeline.run / "teacher", data)
    assert np.isfinite(cache.item_emb.numpy()).all() and np.isfinite(cache.arrays["user_test"].numpy()).all()
    max_item_tokens = pipeline.cfg["teacher"]["max_item_tokens"]
    ids = TextEncoder(str(tiny_bert), device="cpu").tokenize(data.item_texts[:1], max_item_tokens)
    assert len(ids[0]) == max_item_tokens


def test_policy_no_eval_users_warns_at_the_data_stage(tmp_path):
    """Data where no user has 3 interactions is prepared (it may still train a student elsewhere), with a
    warning that gives the counts; the later stages refuse it (the `no_eval_users_*` cases)."""
    cfg = write_yaml(tmp_path / "cfg.yaml", base_config(tmp_path / "run", interactions=BAD / "inter_no_eval_users.csv"))
    proc = run_script("prepare_data.py", cfg, home=tmp_path / "hf_home")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, proc.stderr
    assert "no user has 3 or more interactions" in warnings[0] and "3 users, 5 interactions" in warnings[0]
    assert (tmp_path / "run" / "data" / "meta.json").is_file()


# ---------------------------------------------------------------- policy: one rule for timestamps


ISO = {1000: "1970-01-01T00:16:40", 1001: "1970-01-01T00:16:41Z", 1002: "1970-01-01T01:16:42+01:00"}
"""Unix seconds -> an ISO-8601 string for the same instant (naive = UTC; 'Z' and offsets honoured)."""


def iso_interactions() -> list[dict]:
    """ok_interactions.csv with every timestamp written as an ISO-8601 date-time."""
    import csv

    with open(OK_INTER, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        t = int(row["timestamp"])
        row["timestamp"] = ISO.get(t) or f"1970-01-01T00:{t // 60:02d}:{t % 60:02d}"
    return rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet_strings", "parquet_datetimes"])
def test_policy_iso_timestamps_are_accepted_in_every_format(fmt, tmp_path):
    """One rule for CSV, JSONL and Parquet: a file's timestamps are all numbers or all ISO-8601
    date-times (strings, or a Parquet datetime column); both give the same split as Unix seconds."""
    import pandas as pd

    df = pd.DataFrame(iso_interactions())
    if fmt == "csv":
        path = tmp_path / "inter.csv"
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        path = tmp_path / "inter.jsonl"
        df.to_json(path, orient="records", lines=True)
    else:
        path = tmp_path / "inter.parquet"
        if fmt == "parquet_datetimes":
            df["timestamp"] = pd.to_datetime(df["timestamp"], format="ISO8601", utc=True)
        df.to_parquet(path)
    assert split_by_user(prepare(path)) == split_by_user(prepare(OK_INTER))


def test_policy_numbers_and_dates_do_not_mix():
    """A file whose first timestamp is a number expects numbers in every row (and dates likewise)."""
    from llmkd.infra.artifacts import LlmkdError

    with pytest.raises(LlmkdError, match="row 2: field 'timestamp' is '2021-03-04T10:00:00'; expected a number"):
        prepare(BAD / "inter_text_timestamp.csv")
