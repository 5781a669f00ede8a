"""The serving-memory benchmark (`scripts/benchmark_serving_memory.py`): both settings run side by side in
child processes and report their RSS series, growth and throughput."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_both_settings_report_a_series_growth_and_throughput(served_run, tmp_path):
    from llmkd.serving.bundle import export_bundle

    bundle = export_bundle(served_run[0], "student_text", tmp_path / "b")
    out = tmp_path / "mem"
    proc = subprocess.run([sys.executable, "scripts/benchmark_serving_memory.py", str(bundle), "--seconds", "3",
                           "--max-batch", "8", "--output", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
