"""The tables of README.md and docs/*.md, written from the JSON files in results/ (`make docs`).

A markdown file holds hand-written prose and, between marker comments, generated tables:

    <!-- table:NAME -->
    ...written by TABLES[NAME](results folder)...
    <!-- /table:NAME -->

`render` rewrites every marked block from results/; `stale` names the blocks whose committed text differs
from what `render` would write (tests/test_docs.py runs it over every page). The writers are the ones the
benchmarks used for their own results/*.md (`seeds_markdown`, `kd_markdown`, `online_markdown`, ...), so a
figure has one formatter; the few tables that combine several results files are written here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from llmkd.experiments.coldstart import cold_markdown
from llmkd.experiments.kd_benchmark import kd_markdown
from llmkd.experiments.online import online_markdown
from llmkd.experiments.processes import markdown as processes_markdown
from llmkd.experiments.scale import table as scale_table
from llmkd.experiments.seeds import compare_markdown, seeds_markdown
from llmkd.experiments.serving_cost import serving_cost_markdown
from llmkd.experiments.student_vs_peer import markdown as student_vs_peer_markdown
from llmkd.experiments.teacher_runtime import markdown as teacher_runtime_markdown

MARKER = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.DOTALL)
PAGES = ("README.md", "docs/*.md")


def load(results: Path, name: str) -> dict:
    """results/`name`.json as a dict."""
    return json.loads((results / f"{name}.json").read_text(encoding="utf-8"))


def _seeds(r: dict) -> list[int]:
    """The seeds of a seeds report; older reports name them only in their paired per-seed differences."""
    if "seeds" in r:
        return r["seeds"]
    for p in r["paired"].values():
        if "per_seed" in p["test"]:
            return [int(s) for s in p["test"]["per_seed"]]
    return sorted({int(s) for row in r["rows"].values() for s in row.get("per_seed", {})})


def section(md: str, title: str) -> str:
    """The body of the `## title` section of `md` (up to the next `## `)."""
    parts = re.split(r"^## ", md, flags=re.MULTILINE)
    for p in parts[1:]:
        head, _, body = p.partition("\n")
        if head.strip() == title or head.startswith(title):
            return body.strip()
    raise KeyError(f"no section {title!r}")


def kd_report(results: Path, name: str) -> str:
    """The KD benchmark's own results.md, rewritten from its JSON (`kd_markdown`)."""
    r = load(results, name)
    seeds = _seeds(r)
    return kd_markdown(r["search"], {"markdown": seeds_markdown(r["rows"], r["paired"], seeds)}, r["diagnostics"],
                       r["targets"], seeds, seeds[0], r.get("verdicts", {}))


def kd_table(name: str) -> Callable[[Path], str]:
    """Systems over seeds and their paired differences, each system's overrides, then the targets, of a KD benchmark."""
    def write(results: Path) -> str:
        r = load(results, name)
        settings = [f"- {v}: `{', '.join(dict.fromkeys(o))}`" for v, o in r["variants"].items()]
        return (seeds_markdown(r["rows"], r["paired"], _seeds(r)) + "\n\nEach system's settings (chosen on valid):\n\n"
                + "\n".join(settings) + "\n\nTargets:\n\n" + "\n".join(r["targets"]))
    return write


def kd_section(name: str, title: str) -> Callable[[Path], str]:
    """One section of a KD benchmark's report (`kd_markdown`): "Search on valid", "Diagnostics"."""
    return lambda results: section(kd_report(results, name), title)


def seeds_table(name: str, key: str | None = None) -> Callable[[Path], str]:
    """A seeds report (`rows`, `paired`), at the top of the JSON or under `key`."""
    def write(results: Path) -> str:
        r = load(results, name)
        r = r[key] if key else r
        return seeds_markdown(r["rows"], r["paired"], _seeds(r))
    return write


def compare_table(name: str) -> Callable[[Path], str]:
    return lambda results: compare_markdown(load(results, name))


def from_json(name: str, writer: Callable[[dict], str]) -> Callable[[Path], str]:
    return lambda results: writer(load(results, name)).strip()


def processes(results: Path) -> str:
    """results/processes_cpu.md without its page title, its section title as a bold line."""
    md = processes_markdown(load(results, "processes_cpu")).split("\n", 2)[2].strip()
    return re.sub(r"^## (.+)$", r"**\1**", md, flags=re.MULTILINE)


def _ndcg(row: dict) -> str:
    m = row["test"]["ndcg@10"]
    return f"{m['mean']:.4f} ± {m['std']:.4f}" if m["std"] else f"{m['mean']:.4f}"


def _seed_label(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def _interval(p: dict) -> str:
    """A paired difference and its 95 % interval; a system that ranks exactly as the twin does says so."""
    if p["lo"] == p["hi"] == 0:
        return "none: identical to the twin"
    return f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]"


BEAUTY = "configs/amazon_beauty.yaml"
# Not a results file's figure: RecBole 1.2.1 run on llmkd's protocol, whose home is docs/peers.md.
ML100K_PEERS = {"RecBole SASRec, converged, run on llmkd's protocol": 0.0959}
TEACHER_ITEMS = (f"python scripts/build_teacher.py --config {BEAUTY} --zero-shot --name teacher_items "
                 "--set teacher.user_mode=mean_items")


def headline(results: Path) -> str:
    """README's one table: the strongest no-teacher twin and the teacher's lift on Beauty and ml-100k, the
    published peers beside them, each row with the command that reproduces it."""
    rows = ["| data | system | seeds | test NDCG@10 | paired difference vs the twin (95 % CI) | reproduce |",
            "|---|---|---|---|---|---|"]
    probe = load(results, "amazon_beauty_sasrec_probe")
    twin, first = next(iter(probe["rows"])), next(iter(probe["paired"]))
    lifted = first.rsplit(f" - {twin}", 1)[0]
    p = probe["paired"][first]["test"]
    seeds = _seed_label(probe["seeds"])
    rows.append(f"| Amazon Beauty | {twin} (no teacher) | {seeds} | {_ndcg(probe['rows'][twin])} | | "
                f"`llmkd distill --config {BEAUTY} --set distill.alpha=0 --set distill.name=student_no_kd` |")
    rows.append(f"| Amazon Beauty | {lifted} (ids start from the zero-shot teacher's item vectors) | {seeds} | "
                f"**{_ndcg(probe['rows'][lifted])}** | {_interval(p)} | "
                f"`{TEACHER_ITEMS}`, then `llmkd distill --config {BEAUTY} --set distill.teacher=teacher_items "
                "--set student.content_init=0.1 --set distill.name=content_init` |")
    wide = load(results, "amazon_beauty_d128_seeds")
    twin128, ci128 = list(wide["rows"])[:2]
    p = wide["paired"][f"{ci128} - {twin128}"]["test"]
    rows.append(f"| Amazon Beauty | {twin128} (no teacher; 1.75 M parameters) | {_seed_label(wide['seeds'])} | "
                f"{_ndcg(wide['rows'][twin128])} | | `llmkd distill --config {BEAUTY} --set student.dim=128 "
                "--set distill.name=twin_d128` |")
    rows.append(f"| Amazon Beauty | {ci128} (the same, ids from the teacher's item vectors) | "
                f"{_seed_label(wide['seeds'])} | **{_ndcg(wide['rows'][ci128])}** | {_interval(p)} (vs the 128-d twin) | "
                f"`llmkd distill --config {BEAUTY} --set student.dim=128 --set distill.teacher=teacher_items "
                "--set student.content_init=0.1 --set distill.name=content_init_d128` |")
    for peer, value in load(results, "amazon_beauty_full_ce_probe")["published"].items():
        rows.append(f"| Amazon Beauty | *published:* {peer} | | {value:.4f} | | "
                    "[docs/peers.md](docs/peers.md#amazon-beauty-2014-5-core-published-numbers) |")
    kd = load(results, "amazon_beauty_kd_benchmark")
    chosen, p = kd["chosen"], kd["paired"][f"{kd['chosen']} - student_no_kd"]["test"]
    settings = ", ".join(o for o in dict.fromkeys(kd["variants"][chosen]) if o != "distill.alpha=0")
    rows.append(f"| Amazon Beauty | KD benchmark, an earlier sampled-softmax twin; chosen on valid: `{settings}` | "
                f"{_seed_label(kd['seeds'])} | {_ndcg(kd['rows'][chosen])} (twin {_ndcg(kd['rows']['student_no_kd'])}) | "
                f"{_interval(p)} | `make benchmark-beauty` at commit f6ba43d |")
    demo = load(results, "ml100k_demo_3seeds")
    p = demo["paired"]["student_kd - student_no_kd"]["test"]
    rows.append(f"| MovieLens-100K | `make demo`'s `student_kd` (the recipe search keeps no teacher) | "
                f"{_seed_label(demo['seeds'])} | {_ndcg(demo['rows']['student_kd'])} | {_interval(p)} | `make seeds` |")
    xl = load(results, "ml100k_kd_benchmark_xl")
    best = max((n for n in xl["paired"] if n.endswith(" - student_no_kd")),
               key=lambda n: xl["paired"][n]["test"]["mean"]).rsplit(" - ", 1)[0]
    p = xl["paired"][f"{best} - student_no_kd"]["test"]
    rows.append(f"| MovieLens-100K | KD benchmark, strongest teacher: `{best}` (best on test, not chosen on valid) | "
                f"{_seed_label(_seeds(xl))} | {_ndcg(xl['rows'][best])} | {_interval(p)} | "
                "`make benchmark-kd KD_CONFIG=configs/ml100k_lora_xl.yaml` |")
    for peer, value in ML100K_PEERS.items():
        rows.append(f"| MovieLens-100K | *peer:* {peer} | | {value:.4f} | | [docs/peers.md](docs/peers.md) |")
    return "\n".join(rows)


def load_tests(results: Path) -> str:
    """The 32-client load tests side by side (each file's own table: `llmkd.serving.load_test.markdown`)."""
    rows = [("| 32 clients, `POST /recommend`, k=10 | measured | requests | requests/s | p50 (ms) | p99 (ms) | max (ms) "
            "| errors | server RSS before -> after (second-half growth), MiB | results |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in (("serving_load_cpu_workers2", "ml-100k, `--workers 2`"),
                        ("serving_load_cpu_beauty_workers2", "Beauty, `--workers 2`"),
                        ("serving_load_cpu", "ml-100k, 1 process (the default)"),
                        ("serving_load_cpu_beauty", "Beauty, 1 process")):
        r = load(results, name)
        m = r["server_rss_mb"]
        rows.append(f"| {label} | {r['elapsed_s']:.0f} s | {r['ok']:,} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.1f} | "
                    f"{r['p99_ms']:.1f} | {r['max_ms']:.0f} | {r['errors']} | {m['before']:.1f} -> {m['after']:.1f} "
                    f"({m['growth_second_half']:+.1f}) | `results/{name}.md` |")
    return "\n".join(rows)


def serving_memory(results: Path) -> str:
    r = load(results, "serving_memory_cpu")
    rows = [(f"| user tower over random micro-batches, {r['seconds']:.0f} s | RSS start -> end (MiB) | growth (MiB) | "
            "users/s (median) |"), "|---|---|---|---|"]
    for name, s in r["settings"].items():
        rows.append(f"| {name.replace('_', ' ')} | {s['rss_mb_start']:.1f} -> {s['rss_mb_end']:.1f} | "
                    f"{s['growth_mb']:+.1f} | {s['users_per_s_median']:,.0f} |")
    return "\n".join(rows)


def ann(results: Path) -> str:
    """The fastest FAISS setting with recall@10 >= the target, per sweep (`scripts/ann_sweep.py`)."""
    rows = [("| vectors | items | dim | flat (queries/s) | fastest with recall@10 >= target | recall@10 | queries/s | "
            "× flat | results |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, label in (("ann_sweep_cpu", "clustered synthetic"), ("ann_sweep_cpu_student1m", ("the 1 M-item student "
                        "of the scale run")), ("ann_sweep_cpu_100k", "clustered synthetic")):
        r = load(results, name)
        c = r["choice"]
        params = ", ".join(f"{k} {v}" for k, v in c["params"].items())
        rows.append(f"| {label} | {r['items']:,} | {r['dim']} | {r['flat_qps']:,.0f} | {c['index']} {params} "
                    f"(target {r['target_recall']}) | {c['recall@10']:.3f} | {c['qps']:,.0f} | "
                    f"{c['qps'] / r['flat_qps']:.1f}× | `results/{name}.json` |")
    return "\n".join(rows)


def softmax_cost(results: Path) -> str:
    rows = ["| items | full softmax step (s) | sampled step (s) | full / sampled | extra peak RSS full / sampled (GiB) |",
            "|---|---|---|---|---|"]
    for r in load(results, "softmax_cost_cpu")["ratios"]:
        rows.append(f"| {r['n_items']:,} | {r['full_step_s']:.2f} | {r['sampled_step_s']:.2f} | "
                    f"{r['time_ratio_full_over_sampled']:.1f}× | {r['full_extra_rss_gib']:.2f} / {r['sampled_extra_rss_gib']:.2f} |")
    return "\n".join(rows)


def micro(results: Path) -> str:
    """One row per run of the catalog-size micro-benchmarks (`scripts/benchmark_scale_micro.py`)."""
    rows = ["| benchmark | settings | stage time (s) | peak RSS (GiB) | more |", "|---|---|---|---|---|"]
    for name, timing, extra in (("kd_candidates_cpu", "kd_s", ("candidates_gib", "dense_rows_x_items_gib")),
                                ("eval_blocked_cpu", "eval_s", ("score_block_gib", "users_per_s")),
                                ("index_build_cpu", "index_s", ("vectors_gib",))):
        for r in load(results, name)["runs"]:
            settings = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in r["params"].items())
            more = ", ".join(f"{k} {r[k]:,.2f}" for k in extra if k in r)
            if "recall" in r:
                more += f", recall vs exact {r['recall']:.3f}"
            t = f"{r[timing]:.1f}" if timing in r else "-"
            rows.append(f"| {name.replace('_cpu', '')} | {settings} | {t} | {r['peak_rss_gib']:.2f} | {more} |")
    return "\n".join(rows)


def student_step(results: Path) -> str:
    """Seconds per Beauty training step per `distill.length_groups` (`scripts/benchmark_student_step.py`)."""
    r = load(results, "student_step_cpu")
    rows = [(f"| `distill.length_groups` | seconds per step ({r['threads']} thread) | speed-up over 1 | user-tower tokens "
            "per batch |"), "|---|---|---|---|"]
    rows += [f"| {x['length_groups']} | {x['step_s']:.2f} | {x['speedup_over_1']:.2f}× | {x['tower_tokens_per_batch']:,.0f} |"
             for x in r["settings"]]
    return "\n".join(rows)


def stage_efficiency(results: Path) -> str:
    """Matrix FLOPs and fraction of the measured peak per heavy stage (`scripts/benchmark_stage_efficiency.py`)."""
    r = load(results, "stage_efficiency_cpu")
    rows = ["| stage | unit | seconds per unit | GFLOP per unit | GFLOP/s | fraction of peak | seconds per stage (est.) |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| {name} | {x['unit']} | {x['unit_s']:.2f} | {x['unit_gflop']:.1f} | {x['gflops']:.1f} | "
             f"{x['fraction_of_peak']:.2f} | {x['stage_s']:,.0f} |" for name, x in r["stages"].items()]
    return "\n".join(rows) + (f"\n\nPeak: {r['peak_gflops']:.0f} GFLOP/s (fp32 matrix products, {r['threads']} threads); "
                              f"furthest from its bound: {r['furthest_from_bound']}")


def teacher_speed(results: Path) -> str:
    r = load(results, "teacher_throughput_cpu")
    t = r["texts_per_second"]
    return (f"| encoder ({r['texts']:,} texts, batch {r['batch_size']}, {r['device']}) | texts/s |\n|---|---|\n"
            + "\n".join(f"| {k} | {v:,.0f} |" for k, v in t.items())
            + f"\n\nllmkd / sentence-transformers: {r['speedup_llmkd_over_st']:.2f}×; largest difference of a vector "
              f"entry: {r['max_abs_diff']:.1e}")


def lora_step(results: Path) -> str:
    r = load(results, "teacher_lora_step_cpu")
    return ("| LoRA step (median, s) | seconds |\n|---|---|\n"
            + "\n".join(f"| {k} | {v:.2f} |" for k, v in r["median_step_seconds"].items())
            + f"\n\ncached / whole: {r['speedup_cached_vs_whole']:.2f}× faster; dropout on: {r['slowdown_dropout_on']:.2f}× "
              f"slower; filling the cache: {1000 * r['one_off_lower_layer_seconds_per_text']:.0f} ms per text, once "
              f"({r['torch_threads']} torch thread)")


def teachers(results: Path) -> str:
    """The tuned ml-100k teachers, as the KD benchmarks and the 3-seed demo evaluated them (popularity beside)."""
    rows = ["| teacher | valid NDCG@10 | test NDCG@10 | test Recall@10 | test Recall@50 | results |",
            "|---|---|---|---|---|---|"]
    for label, name, key in (("popularity (train counts)", "ml100k_kd_benchmark_transformer", "popularity"),
                             ("MiniLM + LoRA, `configs/ml100k.yaml` (`make demo`)", "ml100k_demo_3seeds", "teacher"),
                             ("MiniLM + LoRA, `configs/ml100k_lora_long.yaml`", "ml100k_kd_benchmark_transformer", "teacher"),
                             ("MiniLM + LoRA, `configs/ml100k_lora_xl.yaml`", "ml100k_kd_benchmark_xl", "teacher")):
        r = load(results, name)["rows"][key]
        rows.append(f"| {label} | {r['valid']['ndcg@10']['mean']:.4f} | " + " | ".join(
            f"{r['test'][k]['mean']:.4f}" for k in ("ndcg@10", "recall@10", "recall@50")) + f" | `results/{name}.json` |")
    return "\n".join(rows)


TABLES: dict[str, Callable[[Path], str]] = {
    "headline": headline,
    "beauty-kd": kd_table("amazon_beauty_kd_benchmark"),
    "beauty-kd-diagnostics": kd_section("amazon_beauty_kd_benchmark", "Diagnostics"),
    "beauty-full-ce": seeds_table("amazon_beauty_full_ce_probe", "three_seeds"),
    "beauty-full-ce-controls": compare_table("amazon_beauty_full_ce_controls_seed0"),
    "beauty-sasrec-probe": compare_table("amazon_beauty_sasrec_probe"),
    "beauty-d128-probe": compare_table("amazon_beauty_d128_probe"),
    "beauty-d128-seeds": compare_table("amazon_beauty_d128_seeds"),
    "ml100k-demo-seeds": seeds_table("ml100k_demo_3seeds"),
    "ml100k-twin-probe": compare_table("ml100k_twin_probe"),
    "ml100k-kd": kd_table("ml100k_kd_benchmark_transformer"),
    "ml100k-kd-search": kd_section("ml100k_kd_benchmark_transformer", "Search on valid"),
    "ml100k-kd-diagnostics": kd_section("ml100k_kd_benchmark_transformer", "Diagnostics"),
    "ml100k-kd-xl": kd_table("ml100k_kd_benchmark_xl"),
    "ml100k-kd-xl-diagnostics": kd_section("ml100k_kd_benchmark_xl", "Diagnostics"),
    "ml100k-kd-mean": kd_table("ml100k_kd_benchmark_mean"),
    "online-cost": from_json("online_cost_cpu", online_markdown),
    "cold-start": from_json("ml100k_cold_start", cold_markdown),
    "teachers-ml100k": teachers,
    "student-step": student_step,
    "stage-efficiency": stage_efficiency,
    "teacher-runtime": from_json("teacher_runtime_cpu", teacher_runtime_markdown),
    "student-vs-peer": from_json("student_vs_peer_cpu", student_vs_peer_markdown),
    "teacher-speed": teacher_speed,
    "lora-step": lora_step,
    "processes": processes,
    "scale": from_json("scale_cpu", scale_table),
    "scale-minilm": from_json("scale_minilm_cpu", scale_table),
    "softmax-cost": softmax_cost,
    "micro": micro,
    "ann": ann,
    "serving-ml100k": from_json("serving_cpu", serving_cost_markdown),
    "serving-beauty-bundle": from_json("serving_cpu_beauty_bundle", serving_cost_markdown),
    "serving-beauty-teacher": from_json("serving_cpu_beauty", serving_cost_markdown),
    "load-tests": load_tests,
    "serving-memory": serving_memory,
}


def render(text: str, results: Path, where: str = "markdown") -> str:
    """`text` with every marked table rewritten from `results`; an unknown table name is an error."""
    def write(m: re.Match) -> str:
        name = m["name"]
        if name not in TABLES:
            raise KeyError(f"{where}: unknown table {name!r} (known: {', '.join(TABLES)})")
        return f"{m[1]}{TABLES[name](results).strip()}\n{m[4]}"
    return MARKER.sub(write, text)


def stale(text: str, results: Path, where: str = "markdown") -> list[str]:
    """The names of the marked tables in `text` whose committed body differs from what `render` writes."""
    fresh = {m["name"]: m["body"] for m in MARKER.finditer(render(text, results, where))}
    return [m["name"] for m in MARKER.finditer(text) if m["body"] != fresh[m["name"]]]


def pages(root: Path) -> list[Path]:
    """README.md and docs/*.md under `root`."""
    return sorted(p for pattern in PAGES for p in root.glob(pattern))


def make_docs(root: Path, check: bool = False) -> dict[str, list[str]]:
    """Rewrite (or with `check`, only compare) the tables of every page from `root`/results; returns the stale
    tables per page (relative path)."""
    out = {}
    for page in pages(root):
        text = page.read_text(encoding="utf-8")
        where = str(page.relative_to(root))
        found = stale(text, root / "results", where)
        if found:
            out[where] = found
            if not check:
                page.write_text(render(text, root / "results", where), encoding="utf-8")
    return out
