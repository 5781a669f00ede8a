"""The serving-memory benchmark (`scripts/benchmark_serving_memory.py`): both settings run side by side in
child processes, each with its own oneDNN setting, and report their RSS series, growth and throughput."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

ONEDNN_PROBE = """
import atexit, json, os, sys
from pathlib import Path

MODULE = "llmkd.experiments.serving_memory"
if MODULE in sys.orig_argv:  # a child of the benchmark: bundle seconds SETTING seed max_batch
    import torch
    from llmkd.student import TwoTower

    setting, seen, tower = sys.orig_argv[sys.orig_argv.index(MODULE) + 3], set(), TwoTower.serve_user_vectors

    def observed(self, *args, **kwargs):
        seen.add(torch.backends.mkldnn.enabled)
        return tower(self, *args, **kwargs)

    TwoTower.serve_user_vectors = observed
    atexit.register(lambda: (Path(os.environ["ONEDNN_SEEN"]) / f"{setting}.json").write_text(json.dumps(sorted(seen))))
"""
"""A `sitecustomize` for the benchmark's processes: each child records whether oneDNN was on while its user
tower ran, so the test sees what each setting ran rather than the name it was given."""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_both_settings_report_a_series_growth_and_throughput(served_run, tmp_path):
    from llmkd.serving.bundle import export_bundle

    bundle = export_bundle(served_run[0], "student_text", tmp_path / "b")
    out, probe, seen = tmp_path / "mem", tmp_path / "probe", tmp_path / "seen"
    probe.mkdir()
    seen.mkdir()
    (probe / "sitecustomize.py").write_text(ONEDNN_PROBE, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(probe), str(REPO)]), "ONEDNN_SEEN": str(seen)}
    proc = subprocess.run([sys.executable, "scripts/benchmark_serving_memory.py", str(bundle), "--seconds", "3",
                           "--max-batch", "8", "--output", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = {f.stem: json.loads(f.read_text()) for f in seen.glob("*.json")}
    assert ran == {"onednn_off": [False], "onednn_on": [True]}  # the shipped tower without oneDNN, torch's with it
    r = json.loads(out.with_suffix(".json").read_text())
    assert set(r["settings"]) == {"onednn_off", "onednn_on"} and out.with_suffix(".png").stat().st_size > 0
    for run in r["settings"].values():
        s = run["series"]
        assert 3 <= len(s) <= 5 and s[0]["users_per_s"] is None and all(e["users_per_s"] > 0 for e in s[1:])
        assert all(e["rss_mb"] > 10 for e in s) and run["growth_mb"] == pytest.approx(s[-1]["rss_mb"] - s[1]["rss_mb"])
        assert run["users_per_s_median"] > 0


def test_a_folder_that_is_not_a_bundle_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/benchmark_serving_memory.py", str(tmp_path), "--seconds", "1",
                           "--output", str(tmp_path / "m")], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode != 0 and "not a bundle" in proc.stderr and "Traceback" not in proc.stderr
