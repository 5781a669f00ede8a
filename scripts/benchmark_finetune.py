"""Cost of one LoRA tuning step with and without the cached frozen lower layers, side by side.

Both variants adapt the same top `finetune.top_layers` layers on the same batches (user histories +
positives + catalog negatives, forward and backward). "whole model" runs every layer each step;
"cached lower layers" runs the lower layers once per text beforehand (that one-off cost is reported
too) and the top layers per step. The two alternate `--repeats` times in this one process; the ratio
of median step times is reported. Also: dropout on vs off in the "cached" variant.

    python scripts/benchmark_finetune.py --config configs/ml100k.yaml
"""

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from llmkd.commands.cli import config_from, parser, run
from llmkd.data import load_data
from llmkd.experiments.stage_efficiency import lora_batch
from llmkd.teacher import TextEncoder
from llmkd.teacher.finetune import Featurizer, contrastive_loss, lora_config


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file for the result (default: <out_dir>/benchmark_finetune.json)")
    args = p.parse_args()
    cfg = config_from(args)
    from peft import get_peft_model

    fc, tc = cfg.finetune, cfg.teacher
    data = load_data(Path(cfg.out_dir) / "data")
    enc = TextEncoder(tc.model, tc.pooling, tc.batch_size)
    n_layers = enc.model.config.num_hidden_layers
    top = fc.top_layers or 2
    enc.model = get_peft_model(enc.model.float(), lora_config(enc.model.config, fc.__class__(top_layers=top)))
    rng = np.random.default_rng(0)
    batches = [lora_batch(data, enc, cfg, rng) for _ in range(args.repeats)]
    whole, cached = Featurizer(enc, 0), Featurizer(enc, n_layers - top)
    t0 = time.perf_counter()
    prepared = [(cached.prepare(h), cached.prepare(i)) for h, i, _, _ in batches]
    prepare_s = (time.perf_counter() - t0) / (args.repeats * fc.batch_size + sum(len(b[2]) for b in batches))

    def step(feat, b, c, train_mode=False):
        hist, items, ids, n = b
        enc.model.train(train_mode)
        t = time.perf_counter()
        q = feat(hist, c[0] if c else None)
        v = feat(items, c[1] if c else None)
        ids = torch.as_tensor(ids)
        contrastive_loss(q, v[:n], ids[:n], v[n:], ids[n:], fc.temperature).backward()
        enc.model.zero_grad()
        return time.perf_counter() - t

    times = {"whole model": [], "cached lower layers": [], "cached lower layers, dropout on": []}
    step(whole, batches[0], None)  # warm-up
    for b, c in zip(batches, prepared, strict=True):
        times["whole model"].append(step(whole, b, None))
        times["cached lower layers"].append(step(cached, b, c))
        times["cached lower layers, dropout on"].append(step(cached, b, c, train_mode=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": enc.path, "layers": n_layers, "adapted_top_layers": top, "batch_size": fc.batch_size,
        "catalog_negatives": fc.catalog_negatives, "max_history_tokens": tc.max_history_tokens,
        "torch_threads": torch.get_num_threads(), "median_step_seconds": med,
        "speedup_cached_vs_whole": med["whole model"] / med["cached lower layers"],
        "slowdown_dropout_on": med["cached lower layers, dropout on"] / med["cached lower layers"],
        "one_off_lower_layer_seconds_per_text": prepare_s, "repeats": args.repeats,
    }
    out = Path(args.out or Path(cfg.out_dir) / "benchmark_finetune.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run(main)
