"""The teacher's texts encoded by PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8, side by side: speed
ratios, cosine to PyTorch, and the zero-shot teacher's valid NDCG@10 with each (llmkd.experiments.teacher_runtime).

    python scripts/benchmark_teacher_runtime.py --config configs/amazon_beauty.yaml \\
        --output results/teacher_runtime_cpu.json      # and results/teacher_runtime_cpu.md

Reads `<out_dir>/data` (scripts/prepare_data.py first); writes its ONNX files under `<out_dir>/teacher_runtime/`.
Run it on an otherwise idle machine; the ratios are what to compare across runs.
"""

from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.data import load_data
from llmkd.experiments.scale_micro import environment
from llmkd.experiments.teacher_runtime import markdown, teacher_runtime_cost
from llmkd.infra.artifacts import write_json


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--threads", type=int, default=2, help="threads of every runtime (the machine's cores)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--texts", type=int, default=256, help="item texts and history texts per timing")
    p.add_argument("--users", type=int, default=2000, help="valid users the NDCG@10 is measured on")
    p.add_argument("--output", type=Path, required=True, help="results JSON (a .md of the same name beside it)")
    args = p.parse_args()
    cfg = config_from(args)
    data = load_data(Path(cfg.out_dir) / "data")
    folder = Path(cfg.out_dir) / "teacher_runtime"
    folder.mkdir(parents=True, exist_ok=True)
    result = {"config": args.config, "env": environment(),
              **teacher_runtime_cost(cfg, data, folder, threads=args.threads, reps=args.reps, texts=args.texts,
                                     users=args.users, progress=print)}
    write_json(args.output, result)
    args.output.with_suffix(".md").write_text(markdown(result) + "\n", encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    run(main)
