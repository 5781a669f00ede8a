"""One process vs several on this machine, for every heavy stage, and a cost model for GPU clusters.

Each measurement is a real run of the stage through `llmkd STAGE [launch options --] ...` (Accelerate's
launcher): teacher encoding (`--force`, shards split between the processes), LoRA tuning steps (per-process
batch fixed, so N processes train a global batch N times larger) and distillation epochs (no teacher, the
student's own loss). On a CPU the processes share the cores: 1 process gets every core's threads, N
processes cores / N each. Throughputs come from the stages' own meta.json (encoding wall time, LoRA step
time without evaluation and without the first step, the last epoch's time), so process start-up and
model loading are not counted, except in the teacher's wall time, which includes loading the model.

The cost model is an estimate, not a measurement: per-GPU throughput = the measured one-process CPU
throughput x `gpu_speedup` (an assumption), and each optimizer step adds a ring all-reduce of the
trainable parameters' gradients (2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency), over NVLink within a
machine and over the network between machines.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from llmkd.infra.artifacts import LlmkdError, write_json

STAGES = ("teacher", "finetune", "distill")


@dataclass(frozen=True)
class Cluster:
    """Assumptions of the cost model (every one a parameter; defaults are typical, not measured here)."""

    gpu_speedup: float = 50.0
    """One GPU's throughput / this machine's one-process CPU throughput (same model, same batches)."""
    intra_gbps: float = 300.0
    """GB/s between GPUs of one machine (NVLink)."""
    inter_gbps: float = 12.5
    """GB/s between machines (100 Gb/s Ethernet / InfiniBand)."""
    intra_latency_us: float = 10.0
    inter_latency_us: float = 20.0


@dataclass(frozen=True)
class Workload:
    """What the projections are for: a catalog of `items` texts, `lora_steps` tuning steps, one epoch over
    `interactions` training interactions."""

    items: int = 1_000_000
    lora_steps: int = 1_000
    interactions: int = 10_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_options(processes: int, cores: int) -> list[str]:
    """`accelerate launch` options for `processes` CPU (or GPU) processes sharing `cores` cores."""
    opts = ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(max(1, cores // processes))]
    return (["--multi_gpu", "--main_process_port", str(free_port())] if processes > 1 else []) + opts


def stage_arguments(stage: str, processes: int, args) -> tuple[list[str], str]:
    """(script arguments after the config, artifact folder name) of one measurement."""
    tag = f"p{processes}"
    if stage == "teacher":
        return ["--force", "--zero-shot", "--name", f"teacher_{tag}", "--set", f"teacher.shard_size={args.shard_size}"], \
            f"teacher_{tag}"
    if stage == "finetune":
        return ["--force", "--set", f"finetune.output=lora_{tag}", "--set", f"finetune.steps={args.steps}",
                "--set", f"finetune.eval_every={args.steps}", "--set", f"finetune.batch_size={args.batch_size}",
                "--set", f"finetune.cache_pairs={args.cache_pairs}"], f"lora_{tag}"
    return ["--set", f"distill.name=student_{tag}", "--set", "distill.alpha=0", "--set", "distill.user_align=0",
            "--set", "distill.item_align=0", "--set", "student.content_features=false", "--set", "student.content_init=0",
            "--set", f"distill.epochs={args.epochs}", "--set", f"distill.patience={args.epochs}",
            "--set", "distill.drop_last=true"], f"student_{tag}"


def summarise(stage: str, meta: dict, data) -> dict:
    """Throughput of one measured run from the stage's meta.json."""
    procs = meta.get("num_processes") or (meta.get("shards") or {}).get("processes", 1)
    peak = meta["timing"]["peak_rss_mb"] / 1024
    if stage == "teacher":
        from llmkd.teacher import kd_cuts

        tc = meta["config"]
        positions = len(kd_cuts(data, tc["position_stride"])[0]) if tc["position_stride"] else 0
        texts = data.num_items + (3 * data.num_users + positions if tc["user_mode"] == "text" else 0)
        seconds = meta["timing"]["wall_seconds"]
        return {"processes": procs, "seconds": seconds, "texts": texts, "throughput": texts / seconds,
                "unit": "texts/s", "peak_rss_gib_main": round(peak, 3), "allreduce_bytes_per_step": 0,
                "vector_bytes": texts * meta["dim"] * 4}
    if stage == "finetune":
        steps = len(meta["step_losses"]) - 1  # the first step (warm-up) is left out
        seconds = meta["train_seconds"] - meta["first_step_seconds"]
        if steps < 1:
            raise LlmkdError("benchmark: --steps must be >= 2 (the first LoRA step is warm-up, left out)")
        return {"processes": procs, "seconds": seconds, "steps": steps, "global_batch": meta["global_batch_size"],
                "throughput": steps * meta["global_batch_size"] / seconds, "unit": "histories/s",
                "peak_rss_gib_main": round(peak, 3), "allreduce_bytes_per_step": meta["trainable_bytes"]}
    epochs = meta["history"]
    seconds = epochs[-1]["seconds"]  # the last epoch: the first carries the warm-up
    interactions = sum(len(t) for t in data.train)
    return {"processes": procs, "seconds": seconds, "epochs": len(epochs), "train_interactions": interactions,
            "throughput": interactions / seconds, "unit": "train interactions/s (epoch incl. validation)",
            "peak_rss_gib_main": round(peak, 3), "allreduce_bytes_per_step": meta["num_parameters"] * 4,
            "num_parameters": meta["num_parameters"], "batch_size": meta["config"]["distill"]["batch_size"],
            "dim": meta["config"]["student"]["dim"], "num_items": data.num_items}


def ring_seconds(nbytes: float, gpus: int, machines: int, c: Cluster) -> float:
    """One ring all-reduce of `nbytes` over `gpus` x `machines` GPUs (the slowest link sets the pace)."""
    n = gpus * machines
    if n == 1 or nbytes == 0:
        return 0.0
    bw, lat = ((c.inter_gbps, c.inter_latency_us) if machines > 1 else (c.intra_gbps, c.intra_latency_us))
    return 2 * (n - 1) / n * nbytes / (bw * 1e9) + 2 * (n - 1) * lat * 1e-6


def project(runs: dict, c: Cluster, w: Workload) -> list[dict]:
    """Estimated time of the workload per stage on 1 GPU, 8 GPUs and 2 machines x 8 GPUs."""
    rows = []
    for stage in STAGES:
        one = runs.get(f"{stage}/p1")
        if one is None:
            continue
        rate = one["throughput"] * c.gpu_speedup  # per GPU
        for gpus, machines in ((1, 1), (8, 1), (8, 2)):
            n = gpus * machines
            if stage == "teacher":
                bytes_out = w.items * one["vector_bytes"] / one["texts"]
                comm = (n - 1) / n * bytes_out / ((c.inter_gbps if machines > 1 else c.intra_gbps) * 1e9)
                seconds, what = w.items / (n * rate) + comm, f"{w.items:,} item texts"
                per_step = None
            elif stage == "finetune":
                batch = one["global_batch"]  # per GPU, as measured per process
                per_step = batch / rate + ring_seconds(one["allreduce_bytes_per_step"], gpus, machines, c)
                seconds, what = w.lora_steps * per_step, f"{w.lora_steps:,} steps of {batch} histories per GPU"
            else:
                params = one["num_parameters"] + (w.items - one["num_items"]) * one["dim"]
                batch = one["batch_size"]
                per_step = batch / rate + ring_seconds(params * 4, gpus, machines, c)
                steps = w.interactions / (batch * n)
                seconds = steps * per_step
                what = f"1 epoch, {w.interactions:,} interactions, {w.items:,}-item student ({params * 4 / 2**20:,.0f} MiB grads)"
            rows.append({"stage": stage, "gpus": gpus, "machines": machines, "workload": what,
                         "seconds": seconds, "allreduce_share": (None if per_step is None else
                                                                 1 - (batch / rate) / per_step)})
    return rows


def markdown(result: dict) -> str:
    """The tables of results/processes_*.md."""
    lines = ["# One process vs several (measured on this machine)", "",
             (f"{result['machine']}. Each row is one run of the stage through `llmkd STAGE` with Accelerate's "
             "launcher; N processes share the cores (threads per process = cores / N)."), "",
             ("| stage | processes | throughput | per process | speedup vs 1 | seconds | peak RSS (main, GiB) | "
             "all-reduce per step |"), "|---|---|---|---|---|---|---|---|"]
    runs = result["runs"]
    for key, r in sorted(runs.items(), key=lambda kv: (STAGES.index(kv[0].split("/")[0]), kv[1]["processes"])):
        stage = key.split("/")[0]
        base = runs.get(f"{stage}/p1")
        speed = f"{r['throughput'] / base['throughput']:.2f}x" if base else "–"
        lines.append(f"| {stage} | {r['processes']} | {r['throughput']:,.1f} {r['unit']} | "
                     f"{r['throughput'] / r['processes']:,.1f} | {speed} | {r['seconds']:.2f} | "
                     f"{r['peak_rss_gib_main']:.2f} | {r['allreduce_bytes_per_step'] / 2**20:,.2f} MiB |")
    c = result["cluster"]
    lines += ["", "## Cost model (an estimate, not a measurement)", "",
              (f"Assumed: one GPU = {c['gpu_speedup']:g}x the one-process CPU throughput above; NVLink "
              f"{c['intra_gbps']:g} GB/s, {c['intra_latency_us']:g} µs within a machine; {c['inter_gbps']:g} GB/s, "
              f"{c['inter_latency_us']:g} µs between machines; ring all-reduce of the trainable gradients once per "
              "step; teacher vectors gathered once."), "",
              "| stage | workload | 1 GPU | 8 GPUs | 2 machines x 8 GPUs | all-reduce share (2 x 8) |", "|---|---|---|---|---|---|"]
    by_stage: dict[str, list[dict]] = {}
    for row in result["projection"]:
        by_stage.setdefault(row["stage"], []).append(row)
    for stage, rows in by_stage.items():
        share = rows[-1]["allreduce_share"]
        lines.append(f"| {stage} | {rows[0]['workload']} | " + " | ".join(human(r["seconds"]) for r in rows)
                     + f" | {'–' if share is None else f'{share:.0%}'} |")
    return "\n".join(lines) + "\n"


def human(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def run_benchmark(args, cluster: Cluster, workload: Workload) -> dict:
    """Measure every stage at every process count (reusing finished measurements in `<output>.json`),
    write `<output>.json` and `.md` after each, and return the result."""
    from llmkd.data import load_data
    from llmkd.infra.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.out_dir)
    path = Path(f"{args.output}.json")
    result = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    common = ["--config", str(args.config), *[x for o in args.overrides for x in ("--set", o)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)  # the launcher sets threads per process
    if not (out / "data" / "meta.json").is_file():
        _check(subprocess.run([sys.executable, "-m", "llmkd", "prepare", *common], env=env, check=False), "prepare")
    data = load_data(out / "data")
    for stage in args.stages:
        for procs in args.processes:
            key = f"{stage}/p{procs}"
            if key in result["runs"]:
                continue
            extra, folder = stage_arguments(stage, procs, args)
            cmd = [sys.executable, "-m", "llmkd", stage, *launch_options(procs, args.cores), "--", *common, *extra]
            print(f"[{key}] {' '.join(cmd[2:])}", flush=True)
            _check(subprocess.run(cmd, env=env, check=False), key)
            meta = json.loads((out / folder / "meta.json").read_text())
            result["runs"][key] = summarise(stage, meta, data)
            _save(path, result, cluster, workload, args.cores)
    return _save(path, result, cluster, workload, args.cores)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise LlmkdError(f"benchmark run {what} failed (exit {proc.returncode}); its output is above")


def _save(path: Path, result: dict, cluster: Cluster, workload: Workload, cores: int) -> dict:
    """Write `path` (.json) and its .md atomically (a temporary name, then a rename)."""
    import platform

    result.update(machine=f"{cores} CPU cores ({platform.processor() or platform.machine()}), no GPU"
                  if not _cuda() else "GPU machine", cluster=asdict(cluster), workload=asdict(workload),
                  projection=project(result["runs"], cluster, workload))
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((path, None), (path.with_suffix(".md"), markdown(result))):
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        if text is None:
            write_json(tmp, result)
        else:
            tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
