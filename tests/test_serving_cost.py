"""Cost through the bundle (`llmkd.experiments.serving_cost`, scripts/benchmark_serving.py): a smoke run on the tiny run.

Not a measurement (tiny models, a busy test machine): it checks the layout of results/serving_cpu.json,
that the Python API and the HTTP service answer the same users alike, and that a teacher that cannot be
loaded is skipped with its reason rather than failing the run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def bundle(served_run, tmp_path_factory):
    from llmkd.serving.bundle import export_bundle

    return export_bundle(served_run[0], "student_text", tmp_path_factory.mktemp("cost") / "b")


def test_bundle_api_and_http_serve_the_same_items_for_the_same_users(served_run, bundle):
    from llmkd.data import load_data
    from llmkd.experiments.serving_cost import HttpClient, bundle_system, id_histories
    from llmkd.serving import Recommender
    from llmkd.serving.load_test import free_port, start_server, stop_server

    data = load_data(served_run[1] / "data")
    rec = Recommender.from_pretrained(bundle)
    hist = id_histories(data, rec)
    users = data.eval_users("test")[:6]
    port = free_port()
    server = start_server(bundle, port)
    try:
        client = HttpClient(port, hist, 5)
        api = bundle_system(rec, hist, 5)(users)
        assert [r["items"] for r in client(users)] == [r["items"] for r in api]
        assert client(users[:1])["items"] == api[0]["items"]
        time.sleep(5.5)  # uvicorn closes a keep-alive connection idle for 5 s: the client opens a new one
        assert client(users[:1])["items"] == api[0]["items"]
    finally:
        stop_server(server)


def test_one_run_reports_every_system_and_the_ratio_per_teacher(served_run, bundle, tmp_path):
    from llmkd.experiments.serving_cost import measure_serving_cost, serving_cost_markdown, teacher_configs

    from llmkd.serving.onnx import export_onnx

    cfg = served_run[0]
    missing = dataclasses.replace(cfg, out_dir=str(tmp_path / "no_run"))
    export_onnx(bundle)
    r = measure_serving_cost(cfg, bundle, teacher_configs(cfg, [cfg, missing]), latency_users=4, throughput_users=16,
                             teacher_latency_users=2, teacher_throughput_users=8, batch_size=8, repeats=1,
                             http_clients=2, http_seconds=0.5, extra_bundles={"copy": bundle}, onnx=True)
    teacher = f"teacher {served_run[0].teacher.model.rsplit('/', 1)[-1]}"
    expect = {"bundle (batch 1)", "bundle (batch 8)", "http (batch 1)", "http (batch 8)", "http (2 clients)",
              "bundle[copy] (batch 1)", "bundle[copy] (batch 8)", f"{teacher} (batch 1)", f"{teacher} (batch 8)",
              *(f"bundle[{n}] (batch {b})" for n in ("onnx", "copy+onnx") for b in (1, 8))}
    assert set(r["systems"]) == expect
    for name, s in r["systems"].items():
        assert 0 < s["latency_ms_p50"] <= s["latency_ms_p99"] and s["users_per_second"] > 0, name
        assert s["parameters"] > 0
    assert r["systems"]["http (2 clients)"]["errors"] == 0
    assert r["systems"]["bundle (batch 8)"]["batch_size"] == 8 and r["systems"]["bundle (batch 1)"]["calls"] == 4
    ratio = r["ratio_throughput_vs_teacher"][teacher]
    assert set(ratio) == expect - {f"{teacher} (batch 1)", f"{teacher} (batch 8)"}
    got = ratio["bundle (batch 8)"]
    want = r["systems"]["bundle (batch 8)"]["users_per_second"] / r["systems"][f"{teacher} (batch 8)"]["users_per_second"]
    assert np.isclose(got, want)
    assert list(r["teachers_skipped"]) == [f"{cfg.teacher.model} ({tmp_path / 'no_run'})"]
    json.dumps(r)  # JSON-able as written
    assert "Throughput vs" in serving_cost_markdown(r) and "Not measured" in serving_cost_markdown(r)


def test_the_script_refuses_a_missing_bundle_in_one_line(served_run, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts/benchmark_serving.py"), "--set",
                           f"out_dir={served_run[1]}", "--bundle", str(tmp_path / "none"), "--output",
                           str(tmp_path / "o.json")], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "HF_HUB_OFFLINE": "1"}, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error: " in proc.stderr, proc.stderr[-2000:]
