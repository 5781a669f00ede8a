"""Cost-growth benchmark (`scripts/benchmark_scale.py`, `llmkd.experiments.scale`): per-stage measurement,
slopes from the measured runs, reuse / resume / failure handling, and one real run at two tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from pathlib import Path

import pytest
from conftest import REPO

from llmkd.infra.artifacts import LlmkdError
from llmkd.experiments import scale
from llmkd.experiments.scale import DRIVERS, STAGES, Size, measure, slopes


def test_measure_counts_the_stage_not_the_benchmark(tmp_path):
    """This test process holds torch and more (hundreds of MB): a child forked straight from it would
    report that as its own peak."""
    env = dict(os.environ)
    small = measure(["/bin/true"], env, 60, tmp_path / "a.log")
    big = measure([sys.executable, "-c", "import numpy as np; a = np.ones(25_000_000); print(a.sum())"], env, 60,
                  tmp_path / "b.log")
    assert small["peak_rss_gib"] < 0.05 and "error" not in small
    assert 0.18 < big["peak_rss_gib"] < 1.0 and big["wall_s"] > 0
    failed = measure([sys.executable, "-c", "print('first'); print('last words'); raise SystemExit(3)"], env, 60,
                     tmp_path / "c.log")
    assert failed["error"] == "exit 3: last words"
    slow = measure([sys.executable, "-c", "import time; time.sleep(60)"], env, 0.5, tmp_path / "d.log")
    assert "timed out" in slow["error"] and slow["wall_s"] < 30


def test_slopes_are_least_squares_over_successful_sizes():
    def run(n, walls):
        return {"items": n, "users": n, "interactions": 10 * n, "stages": walls}

    runs = [run(100, {"data": {"wall_s": 2.0}, "teacher": {"wall_s": 1.0}}),
            run(1000, {"data": {"wall_s": 20.0}, "teacher": {"wall_s": 100.0}, "index": {"wall_s": 5.0}}),
            run(10000, {"data": {"wall_s": 200.0}, "teacher": {"wall_s": 9.0, "error": "exit 1: x"}})]
    got = slopes(runs)
    assert got["data"] == pytest.approx(1.0) and got["teacher"] == pytest.approx(2.0)  # the failed size is left out
    assert got["index"] is None and got["eval"] is None  # one size, or none


def test_size_parse():
    assert Size.parse("1m:1m:10m") == Size(1_000_000, 1_000_000, 10_000_000)
    assert Size.parse("10k:500:100000") == Size(10_000, 500, 100_000)
    for bad in ("10k:10k", "a:b:c"):
        with pytest.raises(LlmkdError, match="--sizes"):
            Size.parse(bad)


def fake_stage(fail: dict[tuple[str, int], bool]):
    """Stage commands that write the stage's artifact meta.json (or fail where `fail` says), not the real scripts."""
    def command(stage, config, overrides):
        out = next(o.split("=", 1)[1] for o in overrides if o.startswith("out_dir="))
        folder = os.path.join(out, scale.ARTIFACT.get(stage, "student_kd"))
        items = int(next(o for o in overrides if o.startswith("data.items=")).split("syn_")[1].split("i_")[0])
        code = ("import os, sys; os.makedirs(sys.argv[1], exist_ok=True); open(os.path.join(sys.argv[1], 'meta.json'), "
                "'w').write('{}')" if not fail.get((stage, items)) else "raise SystemExit('broken ' + sys.argv[1])")
        return [sys.executable, "-S", "-c", "import sys\n" + code, folder]
    return command


def test_failures_reuse_and_resume(tmp_path, monkeypatch, tiny_bert):
    """A failed stage is recorded, the stages needing it are not run, the other size continues; a rerun
    reuses every finished stage, re-runs one whose artifact is gone and everything after it, and
    --retry-failed runs the failed one again."""
    sizes = [Size(60, 20, 80), Size(120, 40, 160)]
    monkeypatch.setattr(scale, "stage_command", fake_stage({("distill", 60): True}))
    output = tmp_path / "res.json"
    args = (REPO / "configs" / "synthetic_scale.yaml", output, tmp_path / "root", sizes, tiny_bert)
    first = scale.benchmark(*args)
    small, large = first["runs"]
    assert "broken" in small["stages"]["distill"]["error"]
    assert all(small["stages"][s]["error"] == "not run: needs distill, which failed" for s in ("index", "eval"))
    assert all("error" not in large["stages"][s] for s in STAGES)
    again = scale.benchmark(*args)
    assert again["runs"] == first["runs"]  # nothing re-measured
    run_dir = tmp_path / "root" / f"syn_{sizes[1].name}_s0" / "run"
    stamps = {s: (run_dir / f"{s}.log").stat().st_mtime_ns for s in STAGES}
    (run_dir / "index" / "meta.json").unlink()
    resumed = scale.benchmark(*args)
    rerun = {s for s in STAGES if (run_dir / f"{s}.log").stat().st_mtime_ns != stamps[s]}
    assert rerun == {"index", "eval"}
    assert resumed["runs"][0] == first["runs"][0]
    monkeypatch.setattr(scale, "stage_command", fake_stage({}))
    retried = scale.benchmark(*args, retry_failed=True)
    assert all("error" not in retried["runs"][0]["stages"][s] for s in STAGES)
    with pytest.raises(LlmkdError, match="other settings"):
        scale.benchmark(*args[:4], tmp_path / "another_teacher")


def test_a_prefix_of_the_stages_with_a_packaged_teacher(tmp_path, monkeypatch):
    """--stages data teacher runs those two only; a packaged teacher name is passed through, not made as a
    tiny BERT folder; a set of stages that skips one is refused."""
    monkeypatch.setattr(scale, "stage_command", fake_stage({}))
    args = (REPO / "configs" / "synthetic_scale.yaml", tmp_path / "res.json", tmp_path / "root", [Size(60, 20, 80)],
            Path("minilm"))
    monkeypatch.chdir(tmp_path)
    res = scale.benchmark(*args, stages=("data", "teacher"))
    assert set(res["runs"][0]["stages"]) == {"data", "teacher"} and not (tmp_path / "minilm").exists()
    assert res["config"]["teacher"] == "minilm"
    with pytest.raises(LlmkdError, match="first stages"):
        scale.benchmark(*args, stages=("data", "distill"))


def test_benchmark_script_end_to_end(tmp_path):
    """The real stages at two tiny sizes: the layout the checks read, slopes recomputed from the runs,
    and a rerun that reuses every run (no stage runs again)."""
    output = tmp_path / "scale.json"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark_scale.py"), "--sizes", "200:60:400", "400:120:800",
           "--root", str(tmp_path / "root"), "--output", str(output)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(output.read_text())
    assert set(res) == {"config", "runs", "drivers", "slopes"} and res["drivers"] == DRIVERS
    assert [(r["items"], r["users"], r["interactions"]) for r in res["runs"]] == [(200, 60, 400), (400, 120, 800)]
    for r in res["runs"]:
        assert list(r["stages"]) == list(STAGES)
        for stage, m in r["stages"].items():
            assert "error" not in m, (stage, m)
            assert m["wall_s"] > 0 and 0.01 < m["peak_rss_gib"] < 8
    for stage in STAGES:
        x = np.log([r[DRIVERS[stage]] for r in res["runs"]])
        y = np.log([r["stages"][stage]["wall_s"] for r in res["runs"]])
        assert res["slopes"][stage] == pytest.approx((y[1] - y[0]) / (x[1] - x[0]), abs=1e-3)
    assert output.with_suffix(".png").stat().st_size > 0 and "| eval |" in output.with_suffix(".md").read_text()
    logs = sorted((tmp_path / "root").rglob("*.log"))
    stamps = [p.stat().st_mtime_ns for p in logs]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(output.read_text())["runs"] == res["runs"]
    assert [p.stat().st_mtime_ns for p in logs] == stamps  # no stage ran again
