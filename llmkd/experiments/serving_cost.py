"""Cost through the serving bundle: the bundle's Python API, its HTTP service and the teachers, one run.

The same test users, in the same process and alternating over repeats (as `llmkd.experiments.online`, whose teacher
recommender and timer this reuses), through:
- the bundle's Python API (`Recommender.recommend_batch`) at batch 1 and at `batch_size`;
- its HTTP service (`llmkd serve` started here on loopback): one keep-alive client at batch 1
  (`POST /recommend`) and at `batch_size` (`POST /recommend/batch`), then `http_clients` concurrent
  clients for `http_seconds` (`llmkd.serving.load_test`);
- each teacher (history text -> language model (+ LoRA adapter) -> scores over its cached item vectors
  -> top K), from its own run folder, which must hold the same data as the bundle's run.
Every system starts from the user's raw test-time history and ends with K item ids. Per system: latency
p50 / p99 per call, users/s, parameters and memory (resident MiB the system added to this process when
loaded; for HTTP the server process's RSS); `ratio_throughput_vs_teacher` divides each bundle / HTTP
throughput by each teacher's.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from llmkd.data import RecData, load_data
from llmkd.experiments.online import teacher_recommender, time_calls
from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import Config
from llmkd.serving import Recommender
from llmkd.serving.load_test import LoadConfig, free_port, rss_mb, run_phase, start_server, stop_server, summary

System = Callable[[np.ndarray], object]  # (B,) user rows -> K items each


def id_histories(data: RecData, rec: Recommender) -> list[list[str]]:
    """Each user's test-time history as item ids (oldest first), checked against the bundle's vocabulary."""
    out = [[data.item_ids[r] for r in data.history(u, "test")] for u in range(data.num_users)]
    unknown = {i for h in out for i in h} - set(rec.row)
    if unknown:
        raise LlmkdError(f"bundle: {len(unknown)} history items of the run's data are not in its vocabulary (e.g. "
                         f"{sorted(unknown)[:3]}); export the bundle from this run (llmkd export)")
    return out


def bundle_system(rec: Recommender, histories: list[list[str]], k: int) -> System:
    """The Python API: ids in, `recommend_batch` (user tower + FAISS, seen items excluded) out."""
    return lambda users: rec.recommend_batch([histories[u] for u in users], k)


class HttpClient:
    """One keep-alive connection to the service: `POST /recommend` for one user, `/recommend/batch` for more."""

    def __init__(self, port: int, histories: list[list[str]], k: int) -> None:
        self.conn, self.histories, self.k = http.client.HTTPConnection("127.0.0.1", port, timeout=60), histories, k

    def __call__(self, users: np.ndarray) -> object:
        if len(users) == 1:
            return self.post("/recommend", {"history": self.histories[users[0]], "k": self.k})
        return self.post("/recommend/batch", {"histories": [self.histories[u] for u in users], "k": self.k})

    def post(self, path: str, body: dict) -> object:
        try:
            r = self._send(path, body)
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            self.conn.close()  # the server closed an idle keep-alive connection (uvicorn: after 5 s): reconnect
            r = self._send(path, body)
        data = r.read()
        if r.status != 200:
            raise LlmkdError(f"http {path}: status {r.status}: {data[:300]!r}")
        return json.loads(data)

    def _send(self, path: str, body: dict) -> http.client.HTTPResponse:
        self.conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        return self.conn.getresponse()


def teacher_system(cfg: Config, data: RecData, k: int) -> tuple[str, System, int] | str:
    """(name, recommender, parameters) of the teacher of run `cfg`, or why it cannot be measured here."""
    try:
        tdata = load_data(Path(cfg.out_dir) / "data")
        if tdata.fingerprint != data.fingerprint:
            return f"{cfg.out_dir}: other data than the bundle's run (fingerprint {tdata.fingerprint})"
        fn, params = teacher_recommender(cfg, tdata, k)
    except (LlmkdError, OSError, ImportError, ValueError) as e:  # not installed, no run folder, no cache
        return f"{type(e).__name__}: {e}"
    name = f"teacher {Path(cfg.teacher.model).name}" + (" + LoRA" if cfg.teacher.adapter else "")
    return name, fn, params


def stats(seconds: list[float], users: list[int]) -> dict:
    """Latency p50 / p99 per call (ms) and users/s over all calls (`users[i]` users in call i)."""
    ms = np.asarray(seconds) * 1e3
    return {"batch_size": max(users), "calls": len(ms), "latency_ms_p50": float(np.percentile(ms, 50)),
            "latency_ms_p99": float(np.percentile(ms, 99)), "users_per_second": sum(users) / sum(seconds)}


def measure_serving_cost(cfg: Config, bundle: str | Path, teachers: list[Config], latency_users: int = 200,
                         throughput_users: int = 1024, teacher_latency_users: int = 20, teacher_throughput_users: int = 256,
                         batch_size: int = 256, repeats: int = 3, k: int = 10, http_clients: int = 32,
                         http_seconds: float = 10.0, extra_bundles: dict[str, str | Path] | None = None,
                         onnx: bool = False) -> dict:
    """The side-by-side measurement (module docstring); a JSON-able dict (results/serving_cpu.json).
    `extra_bundles` {name: folder}: other students of the same run, timed through their Python API as
    `bundle[name]` beside the main bundle (e.g. a cheaper user tower). `onnx`: each bundle is timed a second
    time with its user tower on ONNX Runtime (`bundle[onnx]`, `bundle[name+onnx]`; `llmkd export-onnx`)."""
    data = load_data(Path(cfg.out_dir) / "data")
    users = data.eval_users("test")
    rng = np.random.default_rng(0)
    lat = rng.choice(users, min(latency_users, len(users)), replace=False)
    thr = rng.choice(users, min(throughput_users, len(users)), replace=False)
    rss0 = rss_mb(os.getpid(), children=False)
    rec = Recommender.from_pretrained(bundle)
    histories = id_histories(data, rec)
    memory = {"bundle": _delta(rss0, rss_mb(os.getpid(), children=False))}
    port = free_port()
    server = start_server(Path(bundle), port)
    try:
        systems = {"bundle": (bundle_system(rec, histories, k), lat, thr, rec.model.num_parameters(False)),
                   "http": (HttpClient(port, histories, k), lat, thr, rec.model.num_parameters(False))}
        variants = [(f"bundle[{name}]", folder, "torch") for name, folder in (extra_bundles or {}).items()]
        if onnx:
            variants = [("bundle[onnx]", bundle, "onnx"), *variants,
                        *[(f"bundle[{name}+onnx]", folder, "onnx") for name, folder in (extra_bundles or {}).items()]]
        for name, folder, backend in variants:
            before = rss_mb(os.getpid(), children=False)
            other = Recommender.from_pretrained(folder, backend)
            memory[name] = _delta(before, rss_mb(os.getpid(), children=False))
            systems[name] = (bundle_system(other, id_histories(data, other), k), lat, thr, other.model.num_parameters(False))
        skipped = {}
        for t in teachers:
            before = rss_mb(os.getpid(), children=False)
            got = teacher_system(t, data, k)
            if isinstance(got, str):
                skipped[f"{t.teacher.model} ({t.out_dir})"] = got
                continue
            name, fn, params = got
            memory[name] = _delta(before, rss_mb(os.getpid(), children=False))
            systems[name] = (fn, lat[:teacher_latency_users], thr[:teacher_throughput_users], params)
        times = _alternate(systems, batch_size, repeats)
        http_load = _http_load(port, histories, thr, k, http_clients, http_seconds, server.pid)
        memory["http"] = rss_mb(server.pid)
    finally:
        stop_server(server)
    return _report(cfg, rec, systems, times, memory, http_load, skipped, batch_size, repeats, k)


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _alternate(systems: dict, batch_size: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of every system at batch 1 and at `batch_size`, the systems alternating per repeat."""
    times = {name: {"1": ([], []), "batch": ([], [])} for name in systems}
    for fn, lat, thr, _ in systems.values():  # warm-up: lazy allocations, first-call paths
        time_calls(fn, [lat[:1], thr[:batch_size]])
    for _ in range(repeats):
        for name, (fn, lat, thr, _) in systems.items():
            for key, calls in (("1", [np.array([u]) for u in lat]),
                               ("batch", [thr[i : i + batch_size] for i in range(0, len(thr), batch_size)])):
                times[name][key][0].extend(time_calls(fn, calls))
                times[name][key][1].extend(len(c) for c in calls)
    return times


def _http_load(port: int, histories: list[list[str]], users: np.ndarray, k: int, clients: int, seconds: float,
               pid: int) -> dict:
    """`clients` concurrent keep-alive clients sending these users' histories for `seconds` (load_test)."""
    bodies = [json.dumps({"history": histories[u], "k": k}).encode() for u in users]
    cfg = LoadConfig(clients=clients, duration_s=seconds, warmup_s=1.0, k=k)
    asyncio.run(run_phase("127.0.0.1", port, bodies, cfg, cfg.warmup_s, cfg.max_requests))
    before = rss_mb(pid)
    phase, elapsed, peak, _ = asyncio.run(run_phase("127.0.0.1", port, bodies, cfg, seconds, cfg.max_requests, pid))
    return {**summary(phase, elapsed), "clients": clients, "server_rss_mb": {"before": before, "after": rss_mb(pid),
                                                                            "peak": peak}}


def _report(cfg, rec, systems, times, memory, http_load, skipped, batch_size, repeats, k) -> dict:
    out = {}
    for name, (_, _, _, params) in systems.items():
        for key, n in (("1", 1), ("batch", batch_size)):
            out[f"{name} (batch {n})"] = {**stats(*times[name][key]), "parameters": params, "memory_mb": memory.get(name)}
    out[f"http ({http_load['clients']} clients)"] = {
        "latency_ms_p50": http_load["p50_ms"], "latency_ms_p99": http_load["p99_ms"],
        "users_per_second": http_load["requests_per_s"], "errors": http_load["errors"],
        "server_rss_mb": http_load["server_rss_mb"], "parameters": rec.model.num_parameters(False)}
    teachers = [n for n in systems if not n.startswith(("bundle", "http"))]
    ratio = {t: {s: out[s]["users_per_second"] / max(out[f"{t} (batch {batch_size})"]["users_per_second"], 1e-12)
                 for s in out if s.startswith(("bundle", "http"))} for t in teachers}
    return {"catalog_items": rec.num_items, "k": k, "batch_size": batch_size, "repeats": repeats,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "run": cfg.out_dir,
            "bundle_index": rec.config.get("index"), "systems": out, "ratio_throughput_vs_teacher": ratio,
            "teachers_skipped": skipped,
            "note": "memory_mb: resident MiB the system added to this process when loaded (http: the server's RSS); "
                    "ratio_throughput_vs_teacher: each bundle / http row's users/s over the teacher's at batch_size"}


def serving_cost_markdown(r: dict) -> str:
    """The result as a markdown table."""
    head = (f"Serving cost on this CPU ({r['torch_threads']} torch threads, {r['cpus']} CPUs; top-{r['k']} of "
            f"{r['catalog_items']} items; {r['repeats']} alternating repeats).")
    lines = [head, "",
             "| system | latency p50 (ms) | latency p99 (ms) | users/s | parameters | memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for name, s in r["systems"].items():
        mem = s.get("memory_mb")
        lines.append(f"| {name} | {_fmt(s['latency_ms_p50'], '.3f')} | {_fmt(s['latency_ms_p99'], '.3f')} | "
                     f"{_fmt(s['users_per_second'], ',.0f')} | {s['parameters']:,} | {_fmt(mem, '.0f')} |")
    for t, ratios in r["ratio_throughput_vs_teacher"].items():
        lines.append(f"\nThroughput vs {t}: " + ", ".join(f"{s} {x:,.0f}x" for s, x in ratios.items()))
    for t, why in r["teachers_skipped"].items():
        lines.append(f"\nNot measured: {t}: {why}")
    return "\n".join(lines)


def _fmt(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def teacher_configs(cfg: Config, extra: list[Config]) -> list[Config]:
    """The run's own teacher first, then the extra teacher runs (their own out_dir), without duplicates."""
    seen, out = set(), []
    for t in [replace(cfg), *extra]:
        key = (t.out_dir, t.teacher.model)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out
