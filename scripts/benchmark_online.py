"""Online cost of the teacher vs the student, side by side in one run on this machine.

Per-user latency (batch of one) and throughput (batches of --batch-size) of the teacher (history text
-> language model -> catalog scores -> top K) and each student (user tower -> FAISS top K), plus
parameter counts; the systems alternate, medians over --repeats.

    python scripts/benchmark_online.py --config configs/ml100k_lora_long.yaml --student seeds/student_no_kd_s0
"""

from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.experiments.online import measure_online_cost, online_markdown
from llmkd.infra.artifacts import write_json


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--student", nargs="+", default=["student_kd"], help="student folder(s) under out_dir")
    p.add_argument("--latency-users", type=int, default=100)
    p.add_argument("--throughput-users", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file (default: <out_dir>/benchmark_online.json); a .md beside it")
    args = p.parse_args()
    cfg = config_from(args)
    result = measure_online_cost(cfg, args.student, args.latency_users, args.throughput_users, args.batch_size,
                                 args.repeats)
    out = Path(args.out or Path(cfg.out_dir) / "benchmark_online.json")
    write_json(out, result)
    md = online_markdown(result)
    out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    print(md)
    print(f"\n-> {out}")


if __name__ == "__main__":
    run(main)
