"""Encode item texts and user histories with the teacher; cache item vectors and per-user top-K."""

from pathlib import Path

from llmkd.cli import config_from, parser, run
from llmkd.data import load_data
from llmkd.teacher import adapter_path, build_teacher_cache


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--force", action="store_true", help="recompute even if the cache matches")
    args = p.parse_args()
    cfg = config_from(args)
    out = Path(cfg.out_dir)
    meta = build_teacher_cache(load_data(out / "data"), cfg.teacher, out / "teacher", force=args.force,
                               adapter=adapter_path(cfg.teacher, out))
    what = "reused (model, data and teacher config unchanged)" if meta["reused"] else "built"
    print(f"teacher cache {what}: {out / 'teacher'} ({meta['model_path']}, {meta['pooling']} pooling, "
          f"{meta['num_parameters']:,} parameters)")


if __name__ == "__main__":
    run(main)
