"""LoRA-tune the teacher on the train split (contrastive history text -> next item); writes a PEFT adapter.

    llmkd finetune --config configs/ml100k.yaml      # = accelerate launch scripts/finetune_teacher.py ...
"""

from pathlib import Path

from llmkd.commands.cli import config_from, parser, run
from llmkd.data import load_data
from llmkd.teacher.finetune import finetune_teacher


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--force", action="store_true", help="retrain even if the adapter matches config, model and data")
    args = p.parse_args()
    cfg = config_from(args)
    meta = finetune_teacher(load_data(Path(cfg.out_dir) / "data"), cfg, force=args.force)
    if meta["reused"]:
        print(f"teacher LoRA reused (config, base model and data unchanged): {Path(cfg.out_dir) / cfg.finetune.output}")
        return
    print(f"teacher LoRA: valid ndcg@10 {meta['zero_shot_valid_ndcg_at_10']:.4f} (zero-shot) -> "
          f"{meta['best_valid_ndcg_at_10']:.4f} on {meta['eval_users']} users; "
          f"{meta['trainable_parameters']:,} trainable parameters -> {Path(cfg.out_dir) / cfg.finetune.output}")


if __name__ == "__main__":
    run(main)
