"""Encode item texts and user histories with the teacher; cache item and user vectors.

    python scripts/build_teacher.py --config configs/amazon_beauty.yaml --zero-shot --name teacher_zero_shot
    python scripts/build_teacher.py --config configs/amazon_beauty.yaml      # -> <out_dir>/teacher

With `teacher.adapter` set, the LoRA adapter is used only if its tuning beat the zero-shot teacher on valid;
otherwise the zero-shot cache is built (or copied from <out_dir>/teacher_zero_shot when that one matches).
Texts are encoded in shards of `teacher.shard_size`: a killed run resumes from its finished shards, and
several processes share them out (the vectors are the same as one process's):

    accelerate launch --multi_gpu --num_processes 2 scripts/build_teacher.py --config configs/ml100k.yaml
    llmkd teacher --multi_gpu --num_processes 2 -- --config configs/ml100k.yaml     # the same
"""

from pathlib import Path

import torch
from accelerate import PartialState

from llmkd.commands.cli import config_from, parser, run
from llmkd.data import load_data
from llmkd.teacher import adapter_path, build_teacher_cache, tuned_adapter


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--force", action="store_true", help="recompute even if the cache matches")
    p.add_argument("--name", default="teacher", help="cache folder under out_dir (default: teacher)")
    p.add_argument("--zero-shot", action="store_true", help="ignore teacher.adapter: the base model's cache")
    args = p.parse_args()
    cfg = config_from(args)
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(cfg.out_dir)
    adapter = None
    if not args.zero_shot:
        adapter, why = tuned_adapter(adapter_path(cfg.teacher, out))
        state.print(why)
    siblings = [f for f in (out / "teacher_zero_shot", out / "teacher") if f.name != args.name]
    meta = build_teacher_cache(load_data(out / "data"), cfg.teacher, out / args.name, force=args.force,
                               adapter=adapter, also=siblings)
    what = (f"copied from {meta['copied_from']}" if "copied_from" in meta else
            "reused (model, data and teacher config unchanged)" if meta["reused"] else
            f"built ({meta['shards']['shards']} shards, {meta['shards']['reused']} reused from a killed run, "
            f"{meta['shards']['processes']} process(es))")
    state.print(f"teacher cache {what}: {out / args.name} ({meta['model_path']}, {meta['pooling']} pooling, "
                f"{meta['num_parameters']:,} parameters)")


if __name__ == "__main__":
    run(main)
