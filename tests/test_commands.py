"""`llmkd COMMAND`: one command for every stage, each running the stage's script with one option style.

The success paths run the real console script (`llmkd`, or `python -m llmkd` where the package is not
installed with its entry points) in a subprocess on the tiny served run (conftest.py `served_run`):
export -> recommend (the JSON equals `Recommender.recommend`) -> add-items -> serve over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from llmkd.commands import SCRIPTS, STAGES, main

CONSOLE = Path(sys.executable).with_name("llmkd")
CONFIG_STAGES = {"prepare", "finetune", "teacher", "distill", "tune", "index", "evaluate", "export", "cold-start",
                 "seeds", "benchmark-kd", "benchmark-serving"}
STUDENT_STAGES = {"index", "export", "cold-start"}
BUNDLE_STAGES = {"recommend", "add-items", "serve", "load-test", "verify"}


def llmkd() -> list[str]:
    """The command line of `llmkd` (the console script when installed, else `python -m llmkd`)."""
    return [str(CONSOLE)] if CONSOLE.is_file() else [sys.executable, "-m", "llmkd"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([*llmkd(), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def help_text(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_stage_of_the_pipeline_and_serving_is_a_command():
    assert {"prepare", "finetune", "teacher", "distill", "tune", "index", "evaluate", "export", "recommend",
            "add-items", "serve"} <= set(STAGES)
    for name, stage in STAGES.items():
        assert (SCRIPTS / stage.script).is_file(), name


@pytest.mark.parametrize("name", sorted(set(STAGES) - {"distill", "finetune"}))
def test_one_option_style_and_the_usage_names_the_command(name, capsys):
    """In-process `llmkd NAME --help` (the launched stages are covered by tests/test_launcher.py)."""
    text = help_text(name, capsys)
    assert text.startswith(f"usage: llmkd {name} "), text[:200]
    options = set(text.replace(",", " ").split())
    if name in CONFIG_STAGES:
        assert {"--config", "--set", "--wait-lock"} <= options, name
    if name in STUDENT_STAGES:
        assert "--student" in options, name
    if name in BUNDLE_STAGES:
        assert "bundle" in text.split("\n\n")[0].split(), name  # the usage block names the positional
    if name == "add-items":
        assert "--wait-lock" in options


@pytest.fixture(scope="module")
def exported(served_run, tmp_path_factory):
    """`llmkd export --config C --set out_dir=... --student student_text --output B` on the tiny run."""
    cfg, out = served_run
    folder = tmp_path_factory.mktemp("commands")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(json.loads(json.dumps(asdict(cfg)))), encoding="utf-8")
    bundle = folder / "B"
    proc = run("export", "--config", str(config), "--set", f"out_dir={out}", "--student", "student_text",
               "--output", str(bundle))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (bundle / "config.json").is_file() and "bundle: student_text" in proc.stdout
    return bundle


def test_recommend_prints_the_python_apis_answer_as_json(exported):
    from llmkd.serving import Recommender

    rec = Recommender.from_pretrained(exported)
    history = rec.item_ids[:3]
    proc = run("recommend", str(exported), "--history", ",".join(history), "--k", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    want = rec.recommend(history, k=5)
    assert got["items"] == want["items"] and len(got["items"]) == 5 and not set(history) & set(got["items"])
    assert got["scores"] == pytest.approx(want["scores"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("args, expect", [
    (["--history", "no-such-item"], "history: unknown item id 'no-such-item'"),
    (["--history", "x", "--k", "0"], "k: expected 1 <= k <="),
])
def test_recommend_refuses_in_one_line_with_exit_2(exported, args, expect):
    proc = run("recommend", str(exported), *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and expect in proc.stderr


def test_a_missing_bundle_is_one_line_and_exit_2(tmp_path):
    proc = run("recommend", str(tmp_path / "nothing"), "--history", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error: " in proc.stderr, proc.stderr[-3000:]


def test_add_items_then_recommend_finds_them(exported, served_run, synthetic, tmp_path):
    """`llmkd add-items B items.csv` (the run's withheld items), then `llmkd recommend` ranks them by their
    cold-start vectors: for the history whose top k (k small) ends with a new item, its answer is that top k
    over the old items' vectors and the new items' vectors computed here from their text (teacher -> the
    student's content projection). New items with other vectors (random, zero) would rank elsewhere."""
    import shutil

    import numpy as np
    import torch

    from llmkd.commands.add_items import student_item_vectors, teacher_item_vectors
    from llmkd.data import load_data
    from llmkd.evaluation.report import load_student
    from llmkd.serving import Recommender
    from llmkd.teacher import TextEncoder

    cfg, out = served_run
    data = load_data(out / "data")
    bundle = tmp_path / "B"
    shutil.copytree(exported, bundle)
    rows = synthetic.items_df[synthetic.items_df["item_id"].astype(str).isin(data.cold_item_ids)]
    rows.to_csv(tmp_path / "items.csv", index=False)
    new = [str(i) for i in rows["item_id"]]
    tc = cfg.teacher
    texts = [data.cold_item_texts[data.cold_item_ids.index(i)] for i in new]
    with torch.inference_mode():
        teacher = teacher_item_vectors(TextEncoder(tc.model, tc.pooling, tc.batch_size, device="cpu"), texts, tc)
        new_vectors = student_item_vectors(load_student(out / "student_text", data), torch.as_tensor(teacher),
                                           out / "student_text").numpy()  # (m, d)
    before = Recommender.from_pretrained(exported)
    n = before.num_items
    ids, table = before.item_ids + new, np.concatenate([before.table[:n].numpy(), new_vectors])  # (n + m, d)

    def expected(item: str) -> tuple[int, float, list[str]]:
        """For the history [item], ranking `table`: the length k of the shortest top list that holds a new item,
        the smallest gap between its k + 1 best scores, and the top k."""
        scores = table @ before.user_vectors([np.asarray([before.row[item]])])[0]
        scores[before.row[item]] = -np.inf
        order = np.argsort(-scores)
        k = int(np.flatnonzero(order >= n)[0]) + 1
        return k, float(np.min(-np.diff(scores[order[: k + 1]]))), [ids[j] for j in order[:k]]

    answers = {item: expected(item) for item in before.item_ids}
    history = min(answers, key=lambda h: (answers[h][0], -answers[h][1]))  # a new item high, clearly ranked
    k, gap, want = answers[history]
    assert k <= n // 2 and gap > 1e-4 and want[-1] in new, answers[history]

    proc = run("add-items", str(bundle), str(tmp_path / "items.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"added {len(rows)} items" in proc.stdout
    proc = run("recommend", str(bundle), "--history", history, "--k", str(k))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["items"] == want


def test_serve_answers_over_http_and_stops_on_sigterm(exported):
    """`llmkd serve B` answers a recommendation (200, the Python API's items and scores) and a bad request
    (4xx naming the id), then stops on SIGTERM."""
    from test_http import call, free_port, wait_until_healthy

    from llmkd.serving import Recommender

    rec = Recommender.from_pretrained(exported)
    history = rec.item_ids[:3]
    want = rec.recommend(history, k=5)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*llmkd(), "serve", str(exported), "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, proc)
        status, body = call(base, "/recommend", {"history": history, "k": 5})
        assert status == 200, body
        assert body["items"] == want["items"] and len(body["items"]) == 5 and not set(history) & set(body["items"])
        assert body["scores"] == pytest.approx(want["scores"], rel=1e-5, abs=1e-6)
        status, body = call(base, "/recommend", {"history": ["no-such-item"], "k": 3})
        assert 400 <= status < 500 and "no-such-item" in body["error"]
    finally:
        proc.send_signal(signal.SIGTERM)  # reaches uvicorn itself: the stage runs in the command's process, no child
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("llmkd serve did not stop on SIGTERM")
    assert code in (0, -signal.SIGTERM), proc.communicate()[1][-3000:]  # uvicorn re-raises it after shutdown
