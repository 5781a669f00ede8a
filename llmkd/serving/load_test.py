"""Load test of the HTTP service on loopback: N concurrent clients for a fixed time, then a report.

    llmkd serve B --port 8000 &  python scripts/load_test.py B --url http://127.0.0.1:8000 --server-pid $!
    python scripts/load_test.py B --clients 32 --duration 30          # starts `llmkd serve B` itself

Clients are asyncio tasks on HTTP/1.1 keep-alive connections in one event loop, so on a small machine
the client takes little CPU from the server it measures. Each sends `POST /recommend` with a history
drawn (seeded) from the bundle's vocabulary, of 1 .. the student's `max_len` items, and times the
request from its first byte written to its last byte read. The run is bounded three ways: it stops at
`duration_s`, or after `max_requests`, whichever comes first, and a request that takes over `timeout_s`
is an error (the connection is reopened). A warm-up (`warmup_s`) precedes the measured phase. The
server's resident memory (Linux /proc) is read before the warm-up, before and after the measured phase
and sampled during it (peak, and a time series with requests/s and p99 per window), so a leak shows as
growth under a steady load and memory that settles as none in the run's second half. Only loopback addresses
are accepted: this is a bench tool, never a load generator against another machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from llmkd.infra.artifacts import LlmkdError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
BODIES = 1024
"""Distinct request bodies drawn per run, sent round-robin (drawn once, so the client does no JSON work)."""


@dataclass
class LoadConfig:
    """A load test's shape: how many clients, for how long, at most how many requests."""

    clients: int = 32
    duration_s: float = 30.0
    max_requests: int = 1_000_000
    warmup_s: float = 2.0
    k: int = 10
    timeout_s: float = 10.0
    seed: int = 0
    rate: float | None = None
    """Requests/s offered in all (open loop: request i is due at i / rate s, whatever came back); None:
    each client sends its next request as soon as its last is answered (closed loop)."""

    def __post_init__(self) -> None:
        checks = {"clients": self.clients >= 1, "duration_s": self.duration_s > 0, "max_requests": self.max_requests >= 1,
                  "warmup_s": self.warmup_s >= 0, "k": self.k >= 1, "timeout_s": self.timeout_s > 0,
                  "rate": self.rate is None or self.rate > 0}
        for name, ok in checks.items():
            if not ok:
                raise LlmkdError(f"{name}: expected {'>= 0' if name == 'warmup_s' else '> 0'}, got {getattr(self, name)}")


def loopback_address(url: str) -> tuple[str, int]:
    """'http://127.0.0.1:8000' -> ('127.0.0.1', 8000); anything but plain HTTP on loopback is refused."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK or parts.port is None:
        raise LlmkdError(f"--url: expected http://127.0.0.1:PORT (loopback only, with a port), got {url!r}")
    return parts.hostname, parts.port


def request_bodies(bundle: Path, k: int, seed: int, n: int = BODIES) -> list[bytes]:
    """`n` JSON bodies {"history": [...], "k": k}: histories of 1 .. max_len distinct ids of the bundle."""
    from llmkd.serving.bundle import ITEM_IDS, STUDENT

    try:
        ids = json.loads((bundle / ITEM_IDS).read_text(encoding="utf-8"))
        max_len = json.loads((bundle / STUDENT / "config.json").read_text(encoding="utf-8"))["max_len"]
    except (OSError, ValueError, KeyError) as e:
        raise LlmkdError(f"{bundle}: not a readable bundle ({e}); write one with `llmkd export`") from None
    if not 1 <= k <= len(ids):
        raise LlmkdError(f"k: expected 1 <= k <= {len(ids)} (the catalog size), got {k}")
    rng = np.random.default_rng(seed)
    longest = min(max_len, len(ids) - k)  # leaves k unseen items to recommend
    out = []
    for _ in range(n):
        rows = rng.choice(len(ids), size=int(rng.integers(1, max(longest, 1) + 1)), replace=False)
        out.append(json.dumps({"history": [ids[r] for r in rows], "k": k}).encode())
    return out


def rss_mb(pid: int | None, children: bool = True) -> float | None:
    """Resident memory of process `pid` in MiB (Linux /proc), with its descendants' (a server's worker
    processes) unless `children=False`; None where it cannot be read."""
    try:
        total = next(int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("VmRSS:"))
    except (OSError, ValueError, TypeError, StopIteration):
        return None
    if children:
        for kid in child_pids(pid):
            total += rss_mb(kid) or 0.0
    return total


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc/PID/task/*/children), [] where they cannot be read."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


class Phase:
    """Shared state of one phase: its deadline and request budget, what came back. `versions` counts the
    answers by the bundle version that gave them (the `x-bundle-version` header), `switches` the largest
    number of version changes one client saw (requests of one client are sequential, so a server that
    swaps models once shows each client at most one change)."""

    def __init__(self, duration_s: float, max_requests: int, rate: float | None = None) -> None:
        self.start = time.perf_counter()
        self.deadline, self.budget, self.rate = self.start + duration_s, max_requests, rate
        self.sent, self.latencies, self.errors = 0, [], Counter()
        self.rejected: list[float] = []  # latencies of 503 answers (the bounded queue's refusals)
        self.versions: Counter = Counter()
        self.switches = 0

    def take(self) -> float | None:
        """When a client may send another request (time and budget left; open loop: when it is due), else
        None; counts it."""
        if self.sent >= self.budget or time.perf_counter() >= self.deadline:
            return None
        due = self.start + self.sent / self.rate if self.rate else 0.0
        self.sent += 1
        return due


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes,
               body: bytes) -> tuple[int, dict[bytes, bytes]]:
    """One keep-alive `POST /recommend`; returns (status, header fields by lower-case name) once the whole
    response body is read."""
    writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    header = await reader.readuntil(b"\r\n\r\n")
    lines = header.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    if b"content-length" not in fields:
        raise ValueError("response without content-length")
    await reader.readexactly(int(fields[b"content-length"]))
    return status, fields


async def client(host: str, port: int, bodies: list[bytes], start: int, phase: Phase, timeout_s: float) -> None:
    """Send requests until the phase ends, reconnecting after an error; record latencies (s) and errors."""
    head = (f"POST /recommend HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n"
            "content-length: ").encode()
    switches = 0
    conn, i, last = None, start, None
    try:
        while (due := phase.take()) is not None:
            body = bodies[i % len(bodies)]
            i += 1
            if due > (t := time.perf_counter()):
                await asyncio.sleep(due - t)
            t = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
                status, fields = await asyncio.wait_for(post(*conn, head, body), timeout_s)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                phase.errors[type(e).__name__] += 1
                conn = await close(conn)
                continue
            if status == 200:
                phase.latencies.append(time.perf_counter() - t)
                version = fields.get(b"x-bundle-version", b"")
                phase.versions[version.decode()] += 1
                switches += last is not None and version != last
                phase.switches, last = max(phase.switches, switches), version
            else:
                phase.errors[f"HTTP {status}"] += 1
                if status == 503:
                    phase.rejected.append(time.perf_counter() - t)
                    if b"retry-after" not in fields:
                        phase.errors["HTTP 503 without Retry-After"] += 1
    finally:
        await close(conn)


async def close(conn: tuple | None) -> None:
    if conn is not None:
        conn[1].close()
        try:
            await conn[1].wait_closed()
        except OSError:
            pass


async def run_phase(host: str, port: int, bodies: list[bytes], cfg: LoadConfig, duration_s: float,
                    max_requests: int, pid: int | None = None) -> tuple[Phase, float, float | None, list[dict]]:
    """`cfg.clients` clients for `duration_s` (or `max_requests`); returns (phase, elapsed s, peak RSS MiB,
    series): the series has one entry per window of `series_window(duration_s)` seconds (its end `t_s`,
    requests/s and p99 in it, the server's RSS at its end), so a leak or a slow stretch shows where it was."""
    phase, peak = Phase(duration_s, max_requests, cfg.rate), rss_mb(pid)
    window, series, seen = series_window(duration_s), [], 0
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(client(host, port, bodies, c * 7919, phase, cfg.timeout_s)) for c in range(cfg.clients)]
    done = asyncio.gather(*tasks)
    while not done.done():
        await asyncio.wait([done], timeout=0.25)
        now, rss = time.perf_counter() - t0, rss_mb(pid)
        peak = max(filter(None, [peak, rss]), default=None)
        if now >= window * (len(series) + 1) or done.done():
            lat = np.asarray(phase.latencies[seen:]) * 1e3
            start = series[-1]["t_s"] if series else 0.0
            series.append({"t_s": now, "requests_per_s": len(lat) / max(now - start, 1e-9),
                           "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None, "rss_mb": rss})
            seen = len(phase.latencies)
    await done
    return phase, time.perf_counter() - t0, peak, series


def series_window(duration_s: float) -> float:
    """Seconds per entry of a phase's time series: 1 s, longer for long runs (at most ~200 entries)."""
    return max(1.0, duration_s / 200)


def summary(phase: Phase, elapsed: float) -> dict[str, Any]:
    """Latency percentiles (ms), requests/s and errors of a measured phase."""
    lat = np.asarray(phase.latencies) * 1e3
    pct = {f"p{q}_ms": float(np.percentile(lat, q)) if len(lat) else None for q in (50, 95, 99)}
    rej = np.asarray(phase.rejected) * 1e3
    return {"requests": phase.sent, "ok": len(lat), "errors": sum(phase.errors.values()),
            "errors_by_kind": dict(phase.errors), "elapsed_s": elapsed, "requests_per_s": len(lat) / elapsed,
            "offered_per_s": phase.sent / elapsed, **pct, "mean_ms": float(lat.mean()) if len(lat) else None,
            "max_ms": float(lat.max()) if len(lat) else None, "rejected_503": len(rej),
            "rejected_p99_ms": float(np.percentile(rej, 99)) if len(rej) else None,
            "versions": dict(phase.versions), "max_version_switches_per_client": phase.switches}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, wait_s: float = 120.0, workers: int = 1, args: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """`llmkd serve bundle --host 127.0.0.1 --port port --workers workers [args]` in a child process (its
    environment: this one's with `env` on top), returned once /health answers."""
    cmd = [sys.executable, "-m", "llmkd", "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--workers", str(workers), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            tail = (proc.stderr.read() if proc.stderr else "")[-2000:]
            raise LlmkdError(f"llmkd serve {bundle} did not start within {wait_s:.0f} s: {tail.strip()}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_test(bundle: str | Path, cfg: LoadConfig, url: str | None = None, server_pid: int | None = None,
              server_workers: int = 1) -> dict:
    """Run a load test against `url` (a server on loopback) or a `llmkd serve --workers server_workers`
    started here; the report (server RSS: the server process and its workers together)."""
    bundle = Path(bundle)
    bodies = request_bodies(bundle, cfg.k, cfg.seed)
    proc = None
    if url is None:
        host, port = "127.0.0.1", free_port()
        proc = start_server(bundle, port, workers=server_workers)
        server_pid = proc.pid
    else:
        host, port = loopback_address(url)
    try:
        rss_start = rss_mb(server_pid)
        warm = asyncio.run(run_phase(host, port, bodies, cfg, cfg.warmup_s, cfg.max_requests))[0] if cfg.warmup_s else None
        rss_before = rss_mb(server_pid)
        phase, elapsed, peak, series = asyncio.run(run_phase(host, port, bodies, cfg, cfg.duration_s,
                                                             cfg.max_requests, server_pid))
        rss_after = rss_mb(server_pid)
    finally:
        if proc is not None:
            stop_server(proc)
    half = [e["rss_mb"] for e in series if e["t_s"] >= elapsed / 2 and e["rss_mb"] is not None]
    return {"bundle": str(bundle), "url": f"http://{host}:{port}/recommend", "server_started_here": proc is not None,
            "server_workers": server_workers if proc is not None else None,
            "config": asdict(cfg), "warmup_requests": warm.sent if warm else 0, **summary(phase, elapsed),
            "server_rss_mb": {"at_start": rss_start, "before": rss_before, "after": rss_after, "peak": peak,
                              "growth": None if rss_after is None or rss_before is None else rss_after - rss_before,
                              "growth_second_half": half[-1] - half[0] if len(half) > 1 else None},
            "client_cpus": os.cpu_count(), "series": series}


def markdown(r: dict) -> str:
    """The report as a markdown table."""
    c, m = r["config"], r["server_rss_mb"]

    def f(x: float | None, fmt: str = ".2f") -> str:
        return "n/a" if x is None else format(x, fmt)

    rows = [("clients", c["clients"]), ("measured for (s)", f(r["elapsed_s"], ".1f")), ("requests ok", r["ok"]),
            ("errors", f"{r['errors']} {r['errors_by_kind'] or ''}".strip()), ("requests/s", f(r["requests_per_s"], ".0f")),
            ("latency p50 / p95 / p99 (ms)", f"{f(r['p50_ms'])} / {f(r['p95_ms'])} / {f(r['p99_ms'])}"),
            ("latency max (ms)", f(r["max_ms"])),
            ("server RSS before / after / peak (MiB)", "{} / {} / {}".format(*(f(m[x], ".1f") for x in
                                                                                ("before", "after", "peak")))),
            ("server RSS growth, whole run / second half (MiB)",
             f"{f(m['growth'], '+.1f')} / {f(m.get('growth_second_half'), '+.1f')}")]
    head = (f"Load test: `POST /recommend` (k={c['k']}) on {r['url']}, {c['clients']} concurrent keep-alive clients, "
            f"{c['duration_s']:g} s after a {c['warmup_s']:g} s warm-up (bundle `{r['bundle']}`"
            + (f"; `llmkd serve --workers {r['server_workers']}`" if (r.get("server_workers") or 1) > 1 else "")
            + ").\n\n")
    return head + "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
