"""Faults of a running `llmkd serve`, measured through real server processes on loopback:

- reload_under_load: 32 clients; the bundle link re-pointed to a new version and `POST /admin/reload` a third
  of the way in: failed requests, answers by version, version changes seen per client, /metrics counts;
- corrupt_bundle: a bundle with one flipped byte (same size) refused at start and at reload, the old one
  still answering;
- overload: p99 of one client alone (unloaded), the closed-loop rate of 32 clients (sustainable), then 4x
  that rate offered open loop: 503s, p99 of the accepted requests, the server's memory over the run; and the
  floor: the same open-loop load on a uvicorn app that does nothing but answer 503 (`refuse_all`), i.e. the
  latency the HTTP stack and the clients alone reach at that rate on this machine;
- metrics_overhead: the same load on a server with and without request counting, alternated;
- drain: SIGTERM during a 32-client run: exit status and time, requests answered by the server vs received.

Every phase uses `llmkd.serving.load_test` (the clients of `llmkd load-test`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from llmkd.serving.bundle import INDEX
from llmkd.serving.load_test import LoadConfig, free_port, load_test, start_server, stop_server
from llmkd.serving.manifest import write_manifest
from llmkd.serving.ops import OVERLOADED, OVERLOADED_START

TOKEN_ENV = "LLMKD_ADMIN_TOKEN"
START_S = 900.0
"""Seconds a server may take to start (on a machine busy with other work, importing torch takes minutes)."""


def call(base: str, path: str, token: str | None = None, post: bool = False) -> tuple[int, Any]:
    """(status, body: JSON or text) of one request."""
    req = urllib.request.Request(base + path, data=b"{}" if post else None, method="POST" if post else "GET",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            return r.status, json.loads(raw) if r.headers.get_content_type() == "application/json" else raw.decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def counter(text: str, route: str, status: int) -> float:
    """llmkd_http_requests_total{route, status} in a /metrics text (0 when absent)."""
    m = re.search(rf'^llmkd_http_requests_total\{{route="{re.escape(route)}",status="{status}"\}} (\S+)$', text, re.M)
    return float(m[1]) if m else 0.0


def point(link: Path, target: Path) -> None:
    """Re-point a symbolic link atomically."""
    tmp = link.with_name(f".{link.name}.new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def versions(bundle: Path, root: Path) -> dict[str, Path]:
    """v1 (a copy of `bundle`), v2 (v1 with a line added to its README: a new version id, same model),
    corrupt (v2 with one byte of the index flipped, same size), and the link `current` -> v1."""
    v1, v2, bad = root / "v1", root / "v2", root / "corrupt"
    shutil.copytree(bundle, v1)
    shutil.copytree(v1, v2)
    with open(v2 / "README.md", "a", encoding="utf-8") as f:
        f.write("\n- Re-released for the reload benchmark.\n")
    write_manifest(v2)
    shutil.copytree(v2, bad)
    flip_byte(bad / INDEX)
    current = root / "current"
    current.symlink_to(v1)
    return {"v1": v1, "v2": v2, "corrupt": bad, "current": current}


def flip_byte(path: Path) -> None:
    """Corrupt `path` in place as a bad disk or a truncated copy would, without changing its size: the
    byte in the middle inverted (only the manifest's SHA-256 can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def run(link: Path, base: str, pid: int | None = None, **cfg: Any) -> dict:
    r = load_test(link, LoadConfig(**{"warmup_s": 0.0, "timeout_s": 30.0, **cfg}), url=base, server_pid=pid)
    r.pop("series", None)
    return r


def reload_under_load(b: dict[str, Path], base: str, pid: int, token: str, seconds: float) -> dict:
    before = call(base, "/metrics")[1]
    out: dict = {}
    load = threading.Thread(target=lambda: out.update(run(b["current"], base, pid, clients=32, duration_s=seconds)))
    load.start()
    time.sleep(seconds / 3)
    point(b["current"], b["v2"])
    status, outcome = call(base, "/admin/reload", token, post=True)
    load.join()
    after = call(base, "/metrics")[1]
    counted = counter(after, "/recommend", 200) - counter(before, "/recommend", 200)
    return {"clients": 32, "seconds": seconds, "requests": out["requests"], "ok": out["ok"],
            "failed_requests": out["errors"], "errors_by_kind": out["errors_by_kind"], "reload_status": status,
            "reload": outcome, "answers_by_version": out["versions"],
            "max_version_switches_per_client": out["max_version_switches_per_client"],
            "p99_ms": out["p99_ms"], "metrics_recommend_200": counted, "metrics_match_load_test": counted == out["ok"]}


def corrupt_bundle(b: dict[str, Path], base: str, token: str) -> dict:
    start = subprocess.run([sys.executable, "-m", "llmkd", "serve", str(b["corrupt"]), "--port", str(free_port())],
                           capture_output=True, text=True, timeout=300, check=False)
    serving = call(base, "/health")[1]["version"]
    point(b["current"], b["corrupt"])
    status, body = call(base, "/admin/reload", token, post=True)
    after = call(base, "/health")[1]["version"]
    ok = load_test(b["current"], LoadConfig(clients=1, duration_s=60, max_requests=20, warmup_s=0), url=base)
    point(b["current"], b["v2"])
    return {"refused": start.returncode == 2 and status == 409,
            "refused_at_start": {"exit": start.returncode, "error": start.stderr.strip().splitlines()[-1]},
            "refused_at_reload": {"status": status, "error": body.get("error")},
            "old_kept_serving": after == serving and ok["ok"] == 20, "version_before": serving, "version_after": after}


def overload(b: dict[str, Path], base: str, pid: int, seconds: float, factor: float = 4.0, clients: int = 512) -> dict:
    unloaded = run(b["current"], base, pid, clients=1, duration_s=seconds, warmup_s=1.0)
    sustainable = run(b["current"], base, pid, clients=32, duration_s=seconds, warmup_s=1.0)
    before = call(base, "/metrics")[1]
    over = load_test(b["current"], LoadConfig(clients=clients, duration_s=seconds * 3, warmup_s=0, timeout_s=30,
                                              rate=factor * sustainable["requests_per_s"]), url=base, server_pid=pid)
    after = call(base, "/metrics")[1]
    series = over.pop("series")
    rss = over["server_rss_mb"]
    return {"unloaded_p99_ms": unloaded["p99_ms"], "unloaded_p50_ms": unloaded["p50_ms"],
            "sustainable_requests_per_s": sustainable["requests_per_s"], "sustainable_p99_ms": sustainable["p99_ms"],
            "offered_per_s": over["offered_per_s"], "target_per_s": factor * sustainable["requests_per_s"],
            "accepted_per_s": over["requests_per_s"], "accepted_p50_ms": over["p50_ms"],
            "accepted_p99_ms": over["p99_ms"], "accepted_p99_over_unloaded": over["p99_ms"] / unloaded["p99_ms"],
            "rejected_503": over["rejected_503"], "rejected_p99_ms": over["rejected_p99_ms"],
            "other_errors": {k: v for k, v in over["errors_by_kind"].items() if k != "HTTP 503"},
            "metrics_503": counter(after, "/recommend", 503) - counter(before, "/recommend", 503),
            "server_rss_mb": {"before": rss["before"], "after": rss["after"], "peak": rss["peak"],
                              "growth": rss["growth"], "growth_second_half": rss["growth_second_half"]},
            "series": [{k: e[k] for k in ("t_s", "requests_per_s", "p99_ms", "rss_mb")} for e in series]}


def with_floor(result: dict, bundle: Path, seconds: float) -> dict:
    """The overload phase's result with its floor (`overload_floor` at the same offered rate) beside it."""
    floor = overload_floor(bundle, result["target_per_s"], seconds * 3)
    return {**result, "floor": floor, "accepted_p99_over_floor": result["accepted_p99_ms"] / floor["p99_ms"]}


async def refuse_all(scope, receive, send) -> None:
    """The overload floor's server (uvicorn, --lifespan off): every request answered 503 + Retry-After from
    the service's own two prepared messages, nothing else."""
    if scope["type"] == "http":
        await send(OVERLOADED_START)
        await send({"type": "http.response.body", "body": OVERLOADED})


def overload_floor(bundle: Path, rate: float, seconds: float, clients: int = 512) -> dict:
    """p50 / p99 of the 503s of `refuse_all` under the overload phase's open-loop load."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", f"{__name__}:refuse_all", "--port", str(port),
                             "--log-level", "warning", "--lifespan", "off"], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(int(START_S / 0.2)):
            try:
                call(f"http://127.0.0.1:{port}", "/")
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"the floor's uvicorn exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
                time.sleep(0.2)
        r = load_test(bundle, LoadConfig(clients=clients, duration_s=seconds, warmup_s=0, timeout_s=30, rate=rate),
                      url=f"http://127.0.0.1:{port}", server_pid=proc.pid)
    finally:
        stop_server(proc)
    return {"offered_per_s": r["offered_per_s"], "answered_503": r["rejected_503"],
            "p99_ms": r["rejected_p99_ms"], "other_errors": {k: v for k, v in r["errors_by_kind"].items() if k != "HTTP 503"}}


def metrics_overhead(bundle: Path, seconds: float, rounds: int = 3) -> dict:
    """32 clients on two servers, with and without counting, alternated `rounds` times."""
    servers = {}
    try:
        for name, args in (("with_metrics", []), ("without_metrics", ["--no-metrics"])):
            port = free_port()
            servers[name] = (start_server(bundle, port, START_S, args=args), f"http://127.0.0.1:{port}")
        runs: dict[str, list] = {name: [] for name in servers}
        for _ in range(rounds):
            for name, (proc, base) in servers.items():
                r = run(bundle, base, proc.pid, clients=32, duration_s=seconds, warmup_s=0.5)
                runs[name].append({"requests_per_s": r["requests_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]})
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    mean = {name: {k: sum(x[k] for x in rs) / len(rs) for k in rs[0]} for name, rs in runs.items()}
    return {"rounds": runs, "mean": mean,
            "throughput_ratio_with_over_without": mean["with_metrics"]["requests_per_s"] /
            mean["without_metrics"]["requests_per_s"],
            "p99_ratio_with_over_without": mean["with_metrics"]["p99_ms"] / mean["without_metrics"]["p99_ms"]}


def drain(bundle: Path, max_requests: int = 2000, drain_timeout: float = 30.0) -> dict:
    """SIGTERM once a tenth of `max_requests` (32 clients) are answered; the clients' later requests find
    the port closed and end the run."""
    port = free_port()
    proc = start_server(bundle, port, START_S, args=["--drain-timeout", str(drain_timeout)])
    base, out = f"http://127.0.0.1:{port}", {}
    load = threading.Thread(target=lambda: out.update(run(bundle, base, clients=32, duration_s=600, timeout_s=60,
                                                          max_requests=max_requests)))
    load.start()
    while counter(call(base, "/metrics")[1], "/recommend", 200) < max_requests // 10:  # mid-load, however slow
        time.sleep(0.05)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        err = proc.communicate(timeout=drain_timeout + 30)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        err = proc.communicate()[1]
    took = time.monotonic() - t
    load.join()
    line = next((x for x in err.splitlines() if "stopped after draining" in x), "")
    answered = int(m[1]) if (m := re.search(r"/recommend 200: (\d+)", line)) else None
    unanswered = int(m[1]) if (m := re.search(r"(\d+) ended without an answer", line)) else None
    dropped = None if answered is None or unanswered is None else (answered - out["ok"]) + unanswered
    return {"exit_code": proc.returncode, "seconds_to_exit": took, "drain_timeout_s": drain_timeout,
            "server_answered_recommend": answered, "client_received_ok": out["ok"], "server_unanswered": unanswered,
            "dropped_accepted": dropped, "client_errors_after_sigterm": out["errors_by_kind"], "server_line": line}


def measure_service_faults(bundle: str | Path, seconds: float = 6.0) -> dict:
    """Every phase above on `bundle` (copied to a temporary folder first); the JSON report."""
    token = os.environ.get(TOKEN_ENV) or "benchmark-token-" + os.urandom(8).hex()
    with tempfile.TemporaryDirectory(prefix="llmkd-faults-") as tmp:
        b = versions(Path(bundle), Path(tmp))
        port = free_port()
        proc = start_server(b["current"], port, START_S, env={TOKEN_ENV: token})
        base = f"http://127.0.0.1:{port}"
        try:
            result = {"bundle": str(bundle), "bundle_items": call(base, "/health")[1]["items"],
                      "reload_under_load": reload_under_load(b, base, proc.pid, token, seconds),
                      "corrupt_bundle": corrupt_bundle(b, base, token),
                      "overload": overload(b, base, proc.pid, seconds / 2)}
        finally:
            stop_server(proc)
        result["overload"] = with_floor(result["overload"], b["v1"], seconds / 2)
        result["metrics_overhead"] = metrics_overhead(b["v1"], seconds / 3)
        result["drain"] = drain(b["v1"])
    return result
