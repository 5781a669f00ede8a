"""The load test (`scripts/load_test.py`, `llmkd.serving.load_test`): loopback only, bounded in time and
requests, stops by itself, and reports latency percentiles, requests/s, errors and the server's RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from llmkd.infra.artifacts import LlmkdError


@pytest.fixture(scope="module")
def bundle(served_run, tmp_path_factory):
    from llmkd.serving.bundle import export_bundle

    return export_bundle(served_run[0], "student_text", tmp_path_factory.mktemp("load") / "b")


def test_a_two_second_run_reports_latency_throughput_errors_and_rss(bundle, tmp_path):
    """`llmkd load-test B` starts the server itself, measures ~2 s and stops it: JSON + markdown."""
    out = tmp_path / "load.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "llmkd", "load-test", str(bundle), "--clients", "4", "--duration", "2",
                           "--warmup", "0.5", "--output", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == 0 and r["ok"] == r["requests"] > 0 and r["server_started_here"]
    assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["elapsed_s"] > 1.9 and r["requests_per_s"] == pytest.approx(r["ok"] / r["elapsed_s"])  # ran its 2 s
    rss = r["server_rss_mb"]
    if sys.platform == "linux":
        assert 10 < rss["before"] <= rss["peak"] and rss["after"] > 10 and rss["growth"] == rss["after"] - rss["before"]
    assert "p50 / p95 / p99" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
    assert "127.0.0.1" in r["url"]
    series = r["series"]  # one entry a second (the last at the end): its requests add up to the run's, RSS sampled
    assert len(series) >= 2 and all(e["t_s"] >= i + 1 for i, e in enumerate(series[:-1]))
    assert [e["t_s"] for e in series] == sorted(e["t_s"] for e in series) and series[-1]["t_s"] <= r["elapsed_s"]
    windows = [e["t_s"] - (series[i - 1]["t_s"] if i else 0) for i, e in enumerate(series)]
    assert sum(e["requests_per_s"] * w for e, w in zip(series, windows)) == pytest.approx(r["ok"], rel=1e-6)
    assert all(e["p99_ms"] is None or 0 < e["p99_ms"] <= r["max_ms"] for e in series)
    if sys.platform == "linux":
        assert all(e["rss_mb"] > 10 for e in series) and rss["growth_second_half"] is not None


def test_the_request_budget_stops_the_run_before_its_time(bundle):
    from llmkd.serving.load_test import LoadConfig, free_port, load_test, start_server, stop_server

    port = free_port()
    server = start_server(bundle, port)
    try:
        r = load_test(bundle, LoadConfig(clients=3, duration_s=120, max_requests=30, warmup_s=0),
                      url=f"http://127.0.0.1:{port}", server_pid=server.pid)
        assert r["elapsed_s"] < r["config"]["duration_s"]  # stopped by the budget, not the clock
        assert r["requests"] == r["ok"] == 30 and r["errors"] == 0 and not r["server_started_here"]
        assert r["server_rss_mb"]["before"] is not None or sys.platform != "linux"
    finally:
        stop_server(server)


def test_failed_requests_are_counted_as_errors_and_the_run_still_ends(bundle):
    from llmkd.serving.load_test import LoadConfig, free_port, load_test

    r = load_test(bundle, LoadConfig(clients=2, duration_s=0.5, warmup_s=0, timeout_s=1),
                  url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert r["ok"] == 0 and r["errors"] == r["requests"] > 0 and r["p50_ms"] is None
    assert set(r["errors_by_kind"]) <= {"ConnectionRefusedError", "OSError", "TimeoutError"}


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://example.com:80", "https://127.0.0.1:8000",
                                 "http://127.0.0.1"])
def test_only_loopback_urls_with_a_port_are_accepted(url):
    from llmkd.serving.load_test import loopback_address

    with pytest.raises(LlmkdError, match="loopback only"):
        loopback_address(url)
    assert loopback_address("http://localhost:8123") == ("localhost", 8123)


def test_bad_settings_are_one_line_errors(bundle, tmp_path):
    from llmkd.serving.load_test import LoadConfig, request_bodies

    with pytest.raises(LlmkdError, match="clients: expected > 0, got 0"):
        LoadConfig(clients=0)
    with pytest.raises(LlmkdError, match="k: expected 1 <= k <="):
        request_bodies(bundle, 10**6, 0)
    with pytest.raises(LlmkdError, match="not a readable bundle"):
        request_bodies(tmp_path, 10, 0)
    bodies = request_bodies(bundle, 5, 0, n=50)
    assert bodies == request_bodies(bundle, 5, 0, n=50)  # seeded
    ids = set(json.loads((bundle / "item_ids.json").read_text()))
    for b in map(json.loads, bodies):
        assert b["k"] == 5 and 1 <= len(b["history"]) == len(set(b["history"])) and set(b["history"]) <= ids
