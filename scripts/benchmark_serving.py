"""Cost through the serving bundle, side by side in one run: Python API (batch 1 and 256), HTTP, teachers.

    python scripts/benchmark_serving.py --config configs/ml100k.yaml --bundle bundles/ml100k \
        --teacher configs/ml100k_smollm2.yaml --output results/serving_cpu.json

The run folder of --config gives the test users and the first teacher (its base model + LoRA adapter and
cached item vectors); each --teacher YAML adds the teacher of its own run folder (same data), skipped with
the reason in the JSON when it is not installed or not built; --teacher-set overrides their configs
(`--teacher-set teacher.adapter=null` times the base model where no adapter was tuned). Writes --output and a markdown table beside.
"""

from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.experiments.serving_cost import measure_serving_cost, serving_cost_markdown, teacher_configs
from llmkd.infra.artifacts import LlmkdError, write_json
from llmkd.infra.config import load_config


def extra_bundles(pairs: list[str]) -> dict[str, str]:
    """['NAME=FOLDER', ...] -> {NAME: FOLDER}; a pair without '=' is an error naming it."""
    out = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise LlmkdError(f"--extra-bundle: expected NAME=FOLDER, got {pair!r}")
        out[name] = folder
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--bundle", required=True, help="bundle folder (llmkd export) of a student of this run")
    p.add_argument("--teacher", action="append", default=[], metavar="YAML",
                   help="another teacher's run config (e.g. configs/ml100k_smollm2.yaml; repeatable)")
    p.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every --teacher config (e.g. teacher.adapter=null: its zero-shot model)")
    p.add_argument("--latency-users", type=int, default=200, help="users timed one at a time (bundle, HTTP)")
    p.add_argument("--throughput-users", type=int, default=1024, help="users timed in batches (bundle, HTTP)")
    p.add_argument("--teacher-latency-users", type=int, default=20)
    p.add_argument("--teacher-throughput-users", type=int, default=256)
    p.add_argument("--extra-bundle", action="append", default=[], metavar="NAME=FOLDER",
                   help="another bundle of this run, timed through its Python API beside --bundle (repeatable)")
    p.add_argument("--onnx", action="store_true", help="also time every bundle with its user tower on ONNX Runtime "
                   "(needs user_tower.onnx in each: llmkd export-onnx BUNDLE)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--http-clients", type=int, default=32)
    p.add_argument("--http-seconds", type=float, default=10.0)
    p.add_argument("--output", default="results/serving_cpu.json", help="JSON file (a .md beside it)")
    args = p.parse_args()
    cfg = config_from(args)
    teachers = teacher_configs(cfg, [load_config(t, args.teacher_set) for t in args.teacher])
    result = measure_serving_cost(cfg, args.bundle, teachers, args.latency_users, args.throughput_users,
                                  args.teacher_latency_users, args.teacher_throughput_users, args.batch_size,
                                  args.repeats, http_clients=args.http_clients, http_seconds=args.http_seconds,
                                  extra_bundles=extra_bundles(args.extra_bundle), onnx=args.onnx)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    md = serving_cost_markdown(result)
    out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    print(md)
    print(f"\n-> {out}")


if __name__ == "__main__":
    run(main)
