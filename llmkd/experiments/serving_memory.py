"""A serving process's memory over time, with torch's oneDNN kernels on and off, side by side in one run.

Under load, `llmkd serve` runs the user tower on micro-batches of every size up to the number of waiting
requests, each padded to its longest history: hundreds of (batch, length) shapes. On CPU, torch's GELU
goes through oneDNN, which JIT-compiles and caches a kernel per input shape, so the memory of a server
grew for minutes. `Recommender` now runs the tower with oneDNN off (`without_onednn`); this benchmark
shows what that changes: two child processes, started together and sharing the machine, each answer a
stream of random micro-batches (1 .. `max_batch` histories drawn from the bundle's vocabulary, as the
load test draws them) through `recommend_batch` for `seconds`; one with the oneDNN path restored. Each
samples its own RSS and throughput every second.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llmkd.infra.artifacts import LlmkdError, write_json

SETTINGS = ("onednn_off", "onednn_on")
"""`onednn_off`: the Recommender as shipped; `onednn_on`: torch's default (the per-shape kernel cache)."""


def child(bundle: str, seconds: float, setting: str, seed: int, max_batch: int) -> dict:
    """One setting's run (in its own process): loads the bundle, answers random micro-batches for `seconds`,
    returns its series [{t_s, rss_mb, users_per_s}] one entry a second."""
    import torch

    from llmkd.serving import Recommender, recommender
    from llmkd.serving.load_test import request_bodies, rss_mb

    torch.set_num_threads(1)  # two children share the machine's cores
    if setting == "onednn_on":
        recommender.without_onednn = contextlib.nullcontext  # the tower as torch runs it by default
    rec = Recommender.from_pretrained(bundle)
    histories = [json.loads(b)["history"] for b in request_bodies(Path(bundle), 10, seed)]
    rng = np.random.default_rng(seed)
    pid = os.getpid()
    series, users, start = [{"t_s": 0.0, "rss_mb": rss_mb(pid, children=False), "users_per_s": None}], 0, time.perf_counter()
    while (now := time.perf_counter() - start) < seconds:
        batch = [histories[i] for i in rng.integers(0, len(histories), int(rng.integers(1, max_batch + 1)))]
        rec.recommend_batch(batch, 10)
        users += len(batch)
        if now >= len(series):
            rate = users / (now - series[-1]["t_s"])
            series.append({"t_s": now, "rss_mb": rss_mb(pid, children=False), "users_per_s": rate})
            users = 0
    return {"setting": setting, "series": series}


def summarize(series: list[dict]) -> dict:
    """Growth over the run (from the first second, after loading) and over its second half; median users/s."""
    end = series[-1]["t_s"]
    half = [e["rss_mb"] for e in series if e["t_s"] >= end / 2]
    return {"rss_mb_start": series[1]["rss_mb"], "rss_mb_end": series[-1]["rss_mb"],
            "growth_mb": series[-1]["rss_mb"] - series[1]["rss_mb"], "growth_second_half_mb": half[-1] - half[0],
            "users_per_s_median": float(np.median([e["users_per_s"] for e in series[1:]]))}


def run_benchmark(bundle: str | Path, seconds: float, output: Path, seed: int = 0, max_batch: int = 32) -> dict:
    """Both settings at once in child processes; writes `output`.json and .png; returns the report."""
    if not sys.platform.startswith("linux"):
        raise LlmkdError("the memory benchmark reads /proc: Linux only")
    if not (Path(bundle) / "config.json").is_file():
        raise LlmkdError(f"{bundle}: not a bundle (no config.json); write one with `llmkd export`")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {s: subprocess.Popen([sys.executable, "-m", __name__, str(bundle), str(seconds), s, str(seed), str(max_batch)],
                                 stdout=subprocess.PIPE, env=env, text=True) for s in SETTINGS}
    from tqdm.auto import tqdm

    with tqdm(total=int(seconds), desc="both settings", unit="s") as bar:
        while any(p.poll() is None for p in procs.values()) and bar.n < seconds:
            time.sleep(1)
            bar.update(1)
    runs = {}
    for setting, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise LlmkdError(f"the {setting} run failed (exit {proc.returncode}); its error is above")
        runs[setting] = json.loads(out)["series"]
    report = {"bundle": str(bundle), "seconds": seconds, "max_batch": max_batch, "seed": seed, "cpus": os.cpu_count(),
              "settings": {s: {**summarize(runs[s]), "series": runs[s]} for s in SETTINGS}}
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output.with_suffix(".json"), report)
    plot(report, output.with_suffix(".png"))
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = {"onednn_off": "oneDNN off (llmkd serving)", "onednn_on": "oneDNN on (torch default)"}
    for setting, run in report["settings"].items():
        s = run["series"][1:]
        ax.plot([e["t_s"] for e in s], [e["rss_mb"] for e in s],
                label=f"{labels[setting]}: {run['growth_mb']:+.1f} MiB, {run['users_per_s_median']:,.0f} users/s")
    ax.set_xlabel(f"seconds of random micro-batches (1-{report['max_batch']} histories)")
    ax.set_ylabel("process RSS (MiB)")
    ax.set_ylim(0, 1.15 * max(e["rss_mb"] for r in report["settings"].values() for e in r["series"]))
    ax.set_title(f"Serving memory over time: {Path(report['bundle']).name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # a child: bundle seconds setting seed max_batch -> its report as JSON on stdout
    b, secs, which, sd, mb = sys.argv[1:6]
    print(json.dumps(child(b, float(secs), which, int(sd), int(mb))))
