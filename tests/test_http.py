"""The HTTP service (`scripts/serve.py`, `llmkd.serving.http`) as a real server process on 127.0.0.1.

Every bad request of the corpus gets a 4xx whose message names the field, never a 500, and the server
keeps answering good requests after all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port, wait_for_server


def call(base: str, path: str, body: object = None, raw: bytes | None = None, method: str | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request; `raw` sends bytes as they are."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_until_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Poll GET /health until it answers 200; fail with the server's stderr if it dies or times out."""
    wait_for_server(proc, lambda: call(base, "/health")[0] == 200, timeout_s)


@pytest.fixture(scope="module")
def server(served_run, tmp_path_factory):
    """A bundle of the tiny text student served by scripts/serve.py; yields (base URL, Recommender)."""
    from llmkd.serving import Recommender
    from llmkd.serving.bundle import export_bundle

    bundle = export_bundle(served_run[0], "student_text", tmp_path_factory.mktemp("http") / "bundle")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts/serve.py"), str(bundle), "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(base, proc)
    yield base, Recommender.from_pretrained(bundle)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_health_metadata_and_docs(server):
    base, rec = server
    status, health = call(base, "/health")
    assert isinstance(health.pop("pid"), int)  # which server process answered (several with --workers)
    assert rec.version and (status, health) == (200, {"status": "ok", "items": rec.num_items, "version": rec.version})
    status, meta = call(base, "/metadata")
    assert status == 200 and meta["num_items"] == rec.num_items and meta["student"] == "student_text"
    assert meta["version"] == rec.version
    with urllib.request.urlopen(base + "/docs", timeout=30) as r:
        assert r.status == 200 and b"swagger" in r.read().lower()
    status, spec = call(base, "/openapi.json")
    assert {"/recommend", "/recommend/batch", "/items/{item_id}/similar", "/health", "/metadata"} <= set(spec["paths"])


def test_recommend_over_http_equals_the_python_api(server):
    base, rec = server
    history = rec.item_ids[:3]
    status, got = call(base, "/recommend", {"history": history, "k": 10})
    expected = rec.recommend(history, k=10)
    assert status == 200 and got["items"] == expected["items"] and len(got["items"]) == 10
    assert not set(got["items"]) & set(history)
    assert got["scores"] == pytest.approx(expected["scores"], rel=1e-5)
    status, got = call(base, "/recommend", {"history": history, "k": 5, "exclude": expected["items"][:2]})
    assert status == 200 and got["items"] == expected["items"][2:7]
    status, batch = call(base, "/recommend/batch", {"histories": [history, [], rec.item_ids[5:6]], "k": 4})
    assert status == 200 and [b["items"] for b in batch] == [r["items"] for r in
                                                            rec.recommend_batch([history, [], rec.item_ids[5:6]], 4)]
    status, sim = call(base, f"/items/{rec.item_ids[7]}/similar?k=3")
    assert status == 200 and sim["items"] == rec.similar_items(rec.item_ids[7], 3)["items"]
    status, got = call(base, "/recommend", {"history": [history[0], "no-such"], "k": 3, "unknown": "drop"})
    assert status == 200 and got["items"] == rec.recommend(history[:1], k=3)["items"]


def bad_requests(n_items: int, known: str) -> list[tuple[str, str, dict]]:
    """(id, field the message must name, request) for the corpus; `request` holds path and body or raw."""
    huge = [known] * 100_000
    return [
        ("malformed json", "body", {"path": "/recommend", "raw": b'{"history": ["1", '}),
        ("empty body", "body", {"path": "/recommend", "raw": b""}),
        ("not utf-8", "body", {"path": "/recommend", "raw": b'{"history": ["\xff\xfe"], "k": 3}'}),
        ("body is a list", "body", {"path": "/recommend", "body": [known]}),
        ("body is a number", "body", {"path": "/recommend", "body": 7}),
        ("deeply nested json", "body", {"path": "/recommend", "raw": b"[" * 100_000 + b"]" * 100_000}),
        ("history missing", "history", {"path": "/recommend", "body": {"k": 3}}),
        ("history is a string", "history", {"path": "/recommend", "body": {"history": known}}),
        ("history holds an int", "history[1]", {"path": "/recommend", "body": {"history": [known, 5]}}),
        ("history holds null", "history[0]", {"path": "/recommend", "body": {"history": [None]}}),
        ("history holds a list", "history[0]", {"path": "/recommend", "body": {"history": [[known]]}}),
        ("unknown id", "no-such-item", {"path": "/recommend", "body": {"history": ["no-such-item"], "k": 10}}),
        ("unknown among known", "'zz9'", {"path": "/recommend", "body": {"history": [known, "zz9"]}}),
        ("history of 100k items", "history", {"path": "/recommend", "body": {"history": huge}}),
        ("k = 0", "k", {"path": "/recommend", "body": {"history": [known], "k": 0}}),
        ("k < 0", "k", {"path": "/recommend", "body": {"history": [known], "k": -3}}),
        ("k above the catalog", "k", {"path": "/recommend", "body": {"history": [known], "k": n_items + 1}}),
        ("k huge", "k", {"path": "/recommend", "body": {"history": [known], "k": 10**30}}),
        ("k a string", "k", {"path": "/recommend", "body": {"history": [known], "k": "10"}}),
        ("k a float", "k", {"path": "/recommend", "body": {"history": [known], "k": 2.5}}),
        ("k a bool", "k", {"path": "/recommend", "body": {"history": [known], "k": True}}),
        ("exclude a string", "exclude", {"path": "/recommend", "body": {"history": [known], "exclude": known}}),
        ("exclude unknown", "exclude", {"path": "/recommend", "body": {"history": [known], "exclude": ["nope"]}}),
        ("unknown field", "kk", {"path": "/recommend", "body": {"history": [known], "kk": 3}}),
        ("bad unknown policy", "unknown", {"path": "/recommend", "body": {"history": [known], "unknown": "maybe"}}),
        ("batch not a list", "histories", {"path": "/recommend/batch", "body": {"histories": known}}),
        ("batch holds an int", "histories[1][0]", {"path": "/recommend/batch", "body": {"histories": [[known], [3]]}}),
        ("batch unknown id", "histories[1]", {"path": "/recommend/batch", "body": {"histories": [[known], ["q"]]}}),
        ("batch too large", "histories", {"path": "/recommend/batch", "body": {"histories": [[known]] * 2000}}),
        ("batch exclude count", "exclude", {"path": "/recommend/batch",
                                            "body": {"histories": [[known]], "exclude": [[], []]}}),
        ("similar unknown item", "item_id", {"path": "/items/no-such/similar"}),
        ("similar k = 0", "k", {"path": f"/items/{known}/similar?k=0"}),
        ("similar k not a number", "k", {"path": f"/items/{known}/similar?k=abc"}),
        ("no such route", "path", {"path": "/nothing"}),
        ("wrong method", "path", {"path": "/recommend", "method": "GET"}),
        # the server refuses on the header, before reading: a client still sending 9 MiB would see a reset
        ("body over the limit", "body", {"path": "/recommend", "raw": b"{}",
                                         "headers": {"Content-Length": str(9 * 1024 * 1024)}}),
    ]


def test_bad_request_corpus(server):
    base, rec = server
    corpus = bad_requests(rec.num_items, rec.item_ids[0])
    assert len(corpus) >= 20
    failures = []
    for name, field, req in corpus:
        status, body = call(base, req["path"], req.get("body"), req.get("raw"), req.get("method"),
                            req.get("headers"))
        message = body.get("error", "")
        if not (400 <= status < 500 and field in message):
            failures.append(f"{name}: {status} {body}")
    assert not failures, "\n".join(failures)
    assert call(base, "/health")[0] == 200  # still serving
    assert call(base, "/recommend", {"history": rec.item_ids[:2], "k": 10})[0] == 200


def maps_a_file_under(pid: int, folder: str) -> bool:
    """Whether process `pid` has a file inside `folder` mapped (Linux /proc/PID/maps): a loaded library's
    shared objects, e.g. torch's once it is imported."""
    return any(f" {folder}/" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def test_several_worker_processes_serve_the_same_answers(served_run, tmp_path):
    """`llmkd serve --workers 2`: uvicorn's worker processes each load the bundle and answer as the Python API
    does, while the supervisor never loads torch (`llmkd.serving.server`: it only supervises); the load test's
    RSS counts the workers too; --workers 0 is refused with a message."""
    import torch

    from llmkd.serving import Recommender
    from llmkd.serving.bundle import export_bundle
    from llmkd.serving.load_test import child_pids, rss_mb

    bundle = export_bundle(served_run[0], "student_text", tmp_path / "bundle")
    rec = Recommender.from_pretrained(bundle)
    port = free_port()
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts/serve.py"), str(bundle), "--port", str(port),
                             "--log-level", "warning", "--workers", "2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, proc)
        for i in range(6):  # several connections: more than one worker may answer
            history = rec.item_ids[i : i + 3]
            status, got = call(base, "/recommend", {"history": history, "k": 5})
            assert status == 200 and got["items"] == rec.recommend(history, k=5)["items"]
        workers = child_pids(proc.pid)
        assert len(workers) >= 2
        torch_dir = str(Path(torch.__file__).resolve().parent)
        assert sum(maps_a_file_under(pid, torch_dir) for pid in workers) >= 2  # the check sees torch where it is
        assert not maps_a_file_under(proc.pid, torch_dir), "the supervisor of --workers 2 imported torch"
        assert rss_mb(proc.pid) > rss_mb(proc.pid, children=False) + 50  # each worker holds torch and the bundle
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    bad = subprocess.run([sys.executable, str(REPO / "scripts/serve.py"), str(bundle), "--workers", "0"], cwd=REPO,
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "--workers: expected >= 1, got 0" in bad.stderr


@pytest.mark.parametrize("path", ["/recommend", "/recommend/batch"])
def test_a_chunked_body_over_the_limit_is_refused_while_reading(server, path):
    """Without a Content-Length (chunked transfer) the size is known only while reading: the server stops at
    the limit with a 413 naming the body, instead of holding the whole stream, and keeps serving."""
    import http.client
    from urllib.parse import urlsplit

    from llmkd.serving.workers import MAX_BODY

    base, rec = server
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    chunk = b" " * (1 << 20)
    try:
        conn.request("POST", path, body=iter([chunk] * (MAX_BODY // len(chunk) + 2)), encode_chunked=True,
                     headers={"content-type": "application/json"})
        response = conn.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status == 413 and body["field"] == "body" and "at most" in body["error"], body
    assert call(base, "/recommend", {"history": rec.item_ids[:2], "k": 3})[0] == 200
    small = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)  # chunked within the limit
    try:
        small.request("POST", "/recommend", body=iter([json.dumps({"history": rec.item_ids[:2], "k": 3}).encode()]),
                      encode_chunked=True, headers={"content-type": "application/json"})
        assert small.getresponse().status == 200
    finally:
        small.close()


def test_a_bad_bundle_with_several_workers_is_one_error_line(tmp_path):
    """`--workers 2`: the supervisor (no torch of its own) checks the bundle in a child first, so a bad bundle
    is the loader's own one-line error, not workers failing and restarting."""
    (tmp_path / "config.json").write_text("{}")
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    bad = subprocess.run([sys.executable, str(REPO / "scripts/serve.py"), str(tmp_path), "--port", str(free_port()),
                          "--workers", "2"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path) in lines[0], bad.stderr
