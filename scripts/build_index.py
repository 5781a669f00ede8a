"""Build a FAISS index over a student's item vectors and write `<out_dir>/index/`."""

from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.data import load_data
from llmkd.evaluation.report import load_student
from llmkd.index import build_index, save_index
from llmkd.infra.artifacts import StageTimer
from llmkd.infra.locks import artifact_lock


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--student", default="student_kd", help="student folder under out_dir")
    args = p.parse_args()
    cfg = config_from(args)
    out = Path(cfg.out_dir)
    with artifact_lock(out / "index"):
        data = load_data(out / "data")
        with StageTimer() as timer:
            model = load_student(out / args.student, data, out)
            index = build_index(model.item_vectors().detach().numpy(), cfg.index)
        save_index(index, data.item_ids, out / "index", cfg.index, data.fingerprint, args.student, timer)
    print(f"index: {cfg.index.type}, {index.ntotal} items x {index.d} dims from {args.student} -> {out / 'index'}")


if __name__ == "__main__":
    run(main)
