"""Item-text encoding throughput: llmkd's TextEncoder vs sentence-transformers, same model, same texts.

Both run in this one process, alternating, `--repeats` times each; the ratio of medians is reported
(shared machines are noisy, so compare side by side rather than against a stored number).

    python scripts/benchmark_teacher.py --config configs/ml100k.yaml
"""

import json
import statistics
import time
from pathlib import Path

import numpy as np

from llmkd.commands.cli import config_from, parser, run
from llmkd.data import load_data
from llmkd.teacher import TextEncoder, item_prompts, resolve_model_path


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file for the result (default: <out_dir>/benchmark_teacher.json)")
    args = p.parse_args()
    cfg = config_from(args)
    from sentence_transformers import SentenceTransformer

    data = load_data(Path(cfg.out_dir) / "data")
    texts = item_prompts(data.item_texts, cfg.teacher)
    tc = cfg.teacher
    ours = TextEncoder(tc.model, tc.pooling, tc.batch_size)
    st = SentenceTransformer(resolve_model_path(tc.model), device=str(ours.device))
    st.max_seq_length = tc.max_item_tokens
    times = {"llmkd": [], "sentence_transformers": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        a = ours.encode(texts, tc.max_item_tokens)
        times["llmkd"].append(time.perf_counter() - t)
        t = time.perf_counter()
        b = st.encode(texts, batch_size=tc.batch_size, normalize_embeddings=True, convert_to_numpy=True)
        times["sentence_transformers"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "texts": len(texts), "model": ours.path, "device": str(ours.device), "batch_size": tc.batch_size,
        "seconds": times, "texts_per_second": {k: len(texts) / v for k, v in med.items()},
        "speedup_llmkd_over_st": med["sentence_transformers"] / med["llmkd"],
        "max_abs_diff": float(np.abs(a - b).max()),
    }
    out = Path(args.out or Path(cfg.out_dir) / "benchmark_teacher.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(texts)} item texts, {ours.path}: llmkd {result['texts_per_second']['llmkd']:.0f}/s, "
          f"sentence-transformers {result['texts_per_second']['sentence_transformers']:.0f}/s, "
          f"ratio {result['speedup_llmkd_over_st']:.2f}x; max |diff| {result['max_abs_diff']:.1e} -> {out}")


if __name__ == "__main__":
    run(main)
