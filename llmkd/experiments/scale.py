"""Cost growth of every stage (issue 14): wall time and peak memory from 10 k to 1 M items.

For each size (items, users, interactions) the synthetic catalog (`llmkd.data.synthetic`) is generated once
(reused while its spec matches), then every stage runs as its own process through its real script:
prepare_data, build_teacher (--force), distill (a fixed number of epochs), build_index, evaluate. A stage's
wall seconds and peak resident memory (the largest of its process and every descendant it waited for,
from `os.wait4`'s rusage in a small wrapper process) are recorded in the results JSON after each stage,
so a killed benchmark resumes:

    {"config": {...}, "runs": [{"items", "users", "interactions", "stages": {stage: {"wall_s", "peak_rss_gib"
     [, "error"]}}}], "drivers": {stage: "items" | "interactions"}, "slopes": {stage: slope}}

A finished (size, stage) is reused while its artifact is on disk; a stage that runs again re-runs every
stage after it (their inputs changed). A failed or timed-out stage is recorded with its error and the
stages that need it are recorded as not run; the other sizes continue. `slopes` are least-squares slopes
of log(wall_s) against log(driver) over the sizes where the stage succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from llmkd.infra.artifacts import LlmkdError

STAGES = ("data", "teacher", "distill", "index", "eval")
DRIVERS = {"data": "interactions", "teacher": "items", "distill": "interactions", "index": "items",
           "eval": "interactions"}
"""What each stage's cost is fitted against: the interaction count for the stages that read every
interaction or user (split, training windows, evaluated users), the item count for those that encode or
index the catalog."""
ARTIFACT = {"data": "data", "teacher": "teacher", "index": "index", "eval": "eval"}  # distill: distill.name
GIB = 1024**3


@dataclass(frozen=True)
class Size:
    """One point of the growth curve."""

    items: int
    users: int
    interactions: int

    @classmethod
    def parse(cls, text: str) -> Size:
        """'ITEMS:USERS:INTERACTIONS' (k / m suffixes allowed, e.g. 1m:1m:10m)."""
        parts = text.lower().split(":")
        if len(parts) != 3:
            raise LlmkdError(f"--sizes {text!r}: expected ITEMS:USERS:INTERACTIONS, e.g. 100k:100k:1m")
        try:
            n = [int(float(p[:-1]) * {"k": 1e3, "m": 1e6}[p[-1]]) if p[-1] in "km" else int(p) for p in parts]
        except (ValueError, IndexError):
            raise LlmkdError(f"--sizes {text!r}: expected whole numbers (k / m suffixes allowed)") from None
        return cls(*n)

    @property
    def name(self) -> str:
        return f"{self.items}i_{self.users}u_{self.interactions}x"


DEFAULT_SIZES = (Size(10_000, 10_000, 100_000), Size(100_000, 100_000, 1_000_000), Size(1_000_000, 1_000_000, 10_000_000))


RUSAGE_WRAPPER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss_kib": usage.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""
"""Runs the stage and writes its peak RSS. A forked child's ru_maxrss starts at its parent's high-water
mark (Linux keeps the pre-exec peak), so the stage is forked from this small interpreter, not from the
benchmark, whose own memory (torch, the synthetic generator) would otherwise be counted."""


def measure(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> dict:
    """Run `cmd` (its own process group), output to `log`; returns wall_s, peak_rss_gib (the largest
    resident set of the process and the descendants it waited for; not a sum over processes running at
    once) and, on failure or timeout, error (the last line of its output)."""
    usage_file = log.with_suffix(".rusage.json")
    usage_file.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-S", "-c", RUSAGE_WRAPPER, str(usage_file), *cmd], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
    result: dict = {"wall_s": round(time.perf_counter() - start, 3)}
    if usage_file.is_file():
        result["peak_rss_gib"] = round(json.loads(usage_file.read_text())["maxrss_kib"] * 1024 / GIB, 4)
        usage_file.unlink()
    if timed_out:
        result["error"] = f"timed out after {timeout:g} s (--stage-timeout)"
    elif proc.returncode != 0:
        lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        result["error"] = f"exit {proc.returncode}: {lines[-1][:300] if lines else 'no output'}"
    return result


def stage_command(stage: str, config: Path, overrides: list[str]) -> list[str]:
    """The real script that runs `stage`, with the benchmark's --set overrides."""
    script = {"data": "prepare_data.py", "teacher": "build_teacher.py", "distill": "distill.py",
              "index": "build_index.py", "eval": "evaluate.py"}[stage]
    extra = {"teacher": ["--force"], "distill": ["--retrain"]}.get(stage, [])
    sets = [a for o in overrides for a in ("--set", o)]
    return [sys.executable, str(Path(__file__).resolve().parents[2] / "scripts" / script), "--config", str(config),
            *sets, *extra]


def slopes(runs: list[dict]) -> dict[str, float | None]:
    """Per stage: least-squares slope of log(wall_s) vs log(driver) over the sizes where it succeeded
    (None with fewer than two distinct driver values)."""
    out: dict[str, float | None] = {}
    for stage in STAGES:
        pts = [(run[DRIVERS[stage]], run["stages"][stage]["wall_s"]) for run in runs
               if stage in run.get("stages", {}) and "error" not in run["stages"][stage]]
        x = np.log([p[0] for p in pts])
        if len(set(x.tolist())) < 2:
            out[stage] = None
            continue
        y = np.log([max(p[1], 1e-6) for p in pts])
        out[stage] = round(float(np.polyfit(x, y, 1)[0]), 3)
    return out


def write_results(path: Path, results: dict) -> None:
    """Write the results JSON atomically (a kill leaves the previous version)."""
    results["slopes"] = slopes(results["runs"])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_results(path: Path, settings: dict) -> dict:
    """The results so far, or a new file; refuses one made with other settings (its runs would not compare)."""
    fresh = {"config": settings, "runs": [], "drivers": DRIVERS, "slopes": {}}
    if not path.is_file():
        return fresh
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LlmkdError(f"{path}: unreadable results ({e}); delete it to start over") from None
    if results.get("config") != settings:
        raise LlmkdError(f"{path}: made with other settings ({results.get('config')}); use another --output "
                         "or delete it to start over")
    return results


def run_entry(results: dict, size: Size) -> dict:
    for run in results["runs"]:
        if (run["items"], run["users"], run["interactions"]) == (size.items, size.users, size.interactions):
            return run
    run = {**asdict(size), "stages": {}}
    results["runs"].append(run)
    return run


def synthetic_folder(root: Path, size: Size, seed: int) -> Path:
    """The synthetic catalog of `size` under `root`, generated unless one with the same spec is there."""
    from llmkd.data.synthetic import SyntheticSpec, write_synthetic

    folder = root / f"syn_{size.name}_s{seed}"
    spec = SyntheticSpec(size.items, size.users, size.interactions, seed)
    meta = folder / "meta.json"
    if not (meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("spec") == asdict(spec)):
        write_synthetic(spec, folder)
    return folder


def stage_env(cache: Path) -> dict[str, str]:
    """Offline; `datasets`' Arrow cache in a fresh folder per run (a reused cache would time a warm read)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(cache))
    return env


def benchmark(config: Path, output: Path, root: Path, sizes: list[Size], teacher: Path, seed: int = 0,
              stage_timeout: float = 4 * 3600, extra: list[str] = (), retry_failed: bool = False,
              stages: tuple[str, ...] = STAGES) -> dict:
    """Run `stages` (the first ones of STAGES; default all) at every size (see the module docstring);
    returns the results written to `output`. `teacher` is a model folder (the tiny random BERT is made
    there if it is missing) or a packaged model name (`llmkd.teacher.models.PACKAGED`, e.g. minilm)."""
    from llmkd.infra.config import load_config
    from llmkd.teacher.models import PACKAGED

    if tuple(stages) != STAGES[: len(stages)]:
        raise LlmkdError(f"stages {list(stages)}: expected the first stages of {list(STAGES)} (each needs the one before)")
    settings = {"config": str(config), "overrides": list(extra), "teacher": str(teacher), "seed": seed}
    output.parent.mkdir(parents=True, exist_ok=True)
    results = read_results(output, settings)
    root.mkdir(parents=True, exist_ok=True)
    if str(teacher) not in PACKAGED and not (teacher / "config.json").is_file():
        make_tiny_bert(teacher)
    bar = tqdm(total=len(sizes) * len(stages), desc="scale", unit="stage")
    for size in sizes:
        folder = synthetic_folder(root, size, seed)
        out = folder / "run"
        overrides = [f"out_dir={out}", f"data.interactions={folder / 'interactions.parquet'}",
                     f"data.items={folder / 'items.parquet'}", f"teacher.model={teacher}", *extra]
        cfg = load_config(config, overrides)
        run = run_entry(results, size)
        rerun, failed = False, None
        for stage in stages:
            bar.set_postfix_str(f"{size.name} {stage}")
            done = run["stages"].get(stage) or {}
            measured, error = "wall_s" in done, "error" in done
            ok = measured and not error and (out / ARTIFACT.get(stage, cfg.distill.name) / "meta.json").is_file()
            if failed is not None:
                run["stages"][stage] = {"error": f"not run: needs {failed}, which failed"}
            elif not rerun and (ok or (measured and error and not retry_failed)):
                failed = stage if error else None
            else:
                cache = out / ".hf_datasets_cache"
                shutil.rmtree(cache, ignore_errors=True)
                out.mkdir(parents=True, exist_ok=True)
                res = measure(stage_command(stage, config, overrides), stage_env(cache), stage_timeout,
                              out / f"{stage}.log")
                shutil.rmtree(cache, ignore_errors=True)
                run["stages"][stage] = res
                rerun, failed = True, (stage if "error" in res else None)
                tqdm.write(f"{size.name} {stage}: " + (res.get("error") or f"{res['wall_s']:.1f} s, "
                                                       f"{res['peak_rss_gib']:.2f} GiB"))
            write_results(output, results)
            bar.update(1)
    bar.close()
    write_results(output, results)
    return results


def plot(results: dict, path: Path) -> None:
    """Log-log wall time and peak RSS per stage against its driver, slope in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        pts = sorted((run[DRIVERS[stage]], run["stages"][stage]) for run in results["runs"]
                     if "wall_s" in run["stages"].get(stage, {}) and "error" not in run["stages"][stage])
        if not pts:
            continue
        x = [p[0] for p in pts]
        slope = results["slopes"].get(stage)
        label = f"{stage} (vs {DRIVERS[stage]}" + (f", slope {slope:.2f})" if slope is not None else ")")
        axes[0].plot(x, [p[1]["wall_s"] for p in pts], "o-", label=label)
        axes[1].plot(x, [p[1]["peak_rss_gib"] for p in pts], "o-", label=stage)
    for ax, what in zip(axes, ("wall time (s)", "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("driver: items or interactions")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("llmkd stage cost vs size (synthetic catalog)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    """Markdown: one row per size and stage."""
    rows = ["| items | users | interactions | stage | wall (s) | peak RSS (GiB) | note |", "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        for stage in STAGES:
            r = run["stages"].get(stage)
            if r is None:
                continue
            wall = f"{r['wall_s']:.1f}" if "wall_s" in r else "-"
            rss = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "-"
            rows.append(f"| {run['items']:,} | {run['users']:,} | {run['interactions']:,} | {stage} | {wall} | {rss} | "
                        f"{r.get('error', '')} |")
    slope = ", ".join(f"{s} {v:.2f}" if v is not None else f"{s} -" for s, v in results["slopes"].items())
    return "\n".join(rows) + f"\n\nslopes (log wall vs log driver): {slope}\n"


def syllable_vocab() -> list[str]:
    """WordPiece vocabulary that spells every synthetic word: the generator's syllables, word-initial and '##'."""
    from llmkd.data.synthetic import CONSONANTS, VOWELS

    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    letters = sorted({ch for s in syllables for ch in s})
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", ":", ";", "|", "(", ")", "-"]
            + syllables + letters + [f"##{s}" for s in syllables + letters])


def make_tiny_bert(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random BERT encoder (hidden 32, 2 layers: the tests' teacher) with a lower-casing WordPiece
    tokenizer over the synthetic syllables (each invented word -> 3 tokens), saved offline in `folder`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(syllable_vocab())}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, vocab_size=len(vocab), max_position_embeddings=512,
                        pad_token_id=vocab["[PAD]"])
    folder = Path(folder)
    if folder.exists():
        raise LlmkdError(f"{folder}: exists; remove it to make a new tiny teacher there")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    BertModel(config).eval().save_pretrained(tmp)
    fast.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder
