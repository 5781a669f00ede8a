"""LoRA-tune the teacher on the train split (contrastive history text -> next item); writes a PEFT adapter.

    accelerate launch scripts/finetune_teacher.py --config configs/ml100k.yaml
"""

from pathlib import Path

from llmkd.cli import config_from, parser, run
from llmkd.data import load_data
from llmkd.finetune import finetune_teacher


def main() -> None:
    cfg = config_from(parser(__doc__).parse_args())
    meta = finetune_teacher(load_data(Path(cfg.out_dir) / "data"), cfg)
    print(f"teacher LoRA: valid ndcg@10 {meta['zero_shot_valid_ndcg_at_10']:.4f} (zero-shot) -> "
          f"{meta['best_valid_ndcg_at_10']:.4f} on {meta['eval_users']} users; "
          f"{meta['trainable_parameters']:,} trainable parameters -> {Path(cfg.out_dir) / cfg.finetune.output}")


if __name__ == "__main__":
    run(main)
