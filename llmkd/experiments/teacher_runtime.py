"""Which runtime encodes the teacher's texts fastest on this CPU without moving its ranking (issue 23: "measure,
do not assume"): PyTorch fp32 (what the pipeline runs), ONNX Runtime fp32, and ONNX Runtime int8 (dynamic
quantisation of the weight matrices, per output channel), side by side in one process on the same texts.

For each runtime:
- seconds per `texts` item texts and per `texts` history texts (median over `reps`; the runtimes take turns
  within each repetition, so a shared machine's load falls on all of them alike: compare the ratios);
- the cosine of its vectors to PyTorch's (the worst and the mean text);
- the zero-shot teacher's valid NDCG@10 on `users` valid users, with the whole catalog and those users'
  histories encoded by that runtime, and its paired per-user difference to PyTorch (95 % bootstrap interval).

    {"config", "model", "threads", "reps", "texts", "users", "runtimes": {name: {"items_s", "histories_s",
     "speedup_items", "speedup_histories", "cosine_min", "cosine_mean", "valid_ndcg@10", "paired_vs_torch"}}}

torch.compile is not among them: every new batch shape (texts are bucketed by length) is a new graph to
compile on the CPU, minutes before the first text is encoded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from llmkd.data import RecData
from llmkd.evaluation.metrics import mask_seen, metrics_from_ranks, paired_bootstrap, target_ranks
from llmkd.infra.config import Config
from llmkd.teacher import TextEncoder, item_prompts, user_prompt

RUNTIMES = ("torch", "onnxruntime_fp32", "onnxruntime_int8")


class _Hidden(torch.nn.Module):
    """The HF model as (input_ids, attention_mask) -> last hidden state, the graph ONNX Runtime runs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_onnx(enc: TextEncoder, folder: Path) -> dict[str, Path]:
    """The encoder's model as ONNX (fp32) and its int8 dynamic quantisation, in `folder`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ids = torch.ones(2, 8, dtype=torch.int64)
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1, max=512)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(_Hidden(enc.model).eval(), (ids, torch.ones_like(ids)),
                                        input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                                        dynamic_shapes={"input_ids": {0: batch, 1: length},
                                                        "attention_mask": {0: batch, 1: length}},
                                        dynamo=True, verbose=False)
    finally:
        quiet.setLevel(level)
    fp32, int8 = folder / "teacher_fp32.onnx", folder / "teacher_int8.onnx"
    program.save(str(fp32))
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    return {"onnxruntime_fp32": fp32, "onnxruntime_int8": int8}


def runtime_embedders(enc: TextEncoder, folder: Path, threads: int) -> dict[str, Callable]:
    """Runtime name -> embed(token_ids) -> (B, d) L2-normalised vectors, pooled as the teacher pools."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in export_onnx(enc, folder).items()}

    def through(sess) -> Callable:
        def embed(token_ids: list[list[int]]) -> torch.Tensor:
            batch = enc.tokenizer.pad({"input_ids": token_ids}, return_tensors="np")
            hidden = sess.run(None, {"input_ids": batch["input_ids"].astype(np.int64),
                                     "attention_mask": batch["attention_mask"].astype(np.int64)})[0]
            return enc.pool(torch.from_numpy(hidden), torch.from_numpy(batch["attention_mask"]))
        return embed

    return {"torch": enc.embed, **{name: through(sess) for name, sess in sessions.items()}}


def per_user_ndcg(users_vecs: np.ndarray, item_vecs: np.ndarray, hists: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """Per-user NDCG@10 of cosine scores, seen items masked (llmkd's protocol)."""
    scores = mask_seen(torch.from_numpy(users_vecs) @ torch.from_numpy(item_vecs).T, hists)
    return metrics_from_ranks(target_ranks(scores, torch.as_tensor(targets)).numpy(), (10,))["ndcg@10"]


def teacher_runtime_cost(cfg: Config, data: RecData, folder: Path, threads: int = 2, reps: int = 3,
                         texts: int = 256, users: int = 2000, seed: int = 0, progress: Callable = lambda s: None) -> dict:
    """The comparison in the module doc, for `cfg.teacher` (zero-shot: no adapter) on `data`; ONNX files in `folder`."""
    tc = cfg.teacher
    torch.set_num_threads(threads)
    enc = TextEncoder(tc.model, tc.pooling, tc.batch_size, device="cpu")
    embedders = runtime_embedders(enc, Path(folder), threads)
    rng = np.random.default_rng(seed)
    pool = data.eval_users("valid")
    chosen = np.sort(rng.choice(pool, min(users, len(pool)), replace=False))
    hists = [data.history(u, "valid") for u in chosen]
    item_tok = enc.tokenize(item_prompts(data.item_texts, tc), tc.max_item_tokens)
    user_tok = enc.tokenize([user_prompt(data.item_texts, h, tc) for h in hists], tc.max_history_tokens)
    timed = {"items": [item_tok[i] for i in rng.choice(len(item_tok), min(texts, len(item_tok)), replace=False)],
             "histories": [user_tok[i] for i in rng.choice(len(user_tok), min(texts, len(user_tok)), replace=False)]}
    seconds = {(r, kind): [] for r in embedders for kind in timed}
    for name in embedders:  # warm-up: first calls allocate and pick kernels
        enc.encode_tokens(timed["items"][: tc.batch_size], embed=embedders[name])
    for rep in range(reps):
        for kind, toks in timed.items():
            for name, embed in embedders.items():
                t0 = time.perf_counter()
                enc.encode_tokens(toks, embed=embed)
                seconds[(name, kind)].append(time.perf_counter() - t0)
        progress(f"timing: repetition {rep + 1} of {reps}")
    vectors, ndcg = {}, {}
    for name, embed in embedders.items():
        item_vecs = enc.encode_tokens(item_tok, embed=embed)
        user_vecs = enc.encode_tokens(user_tok, embed=embed)
        vectors[name] = np.concatenate([item_vecs, user_vecs])
        ndcg[name] = per_user_ndcg(user_vecs, item_vecs, hists, data.valid_item[chosen])
        progress(f"quality: {name} ({ndcg[name].mean():.4f})")
    base = {kind: float(np.median(seconds[("torch", kind)])) for kind in timed}
    out = {}
    for name in embedders:
        cos = (vectors[name] * vectors["torch"]).sum(1)
        med = {kind: float(np.median(seconds[(name, kind)])) for kind in timed}
        out[name] = {"items_s": med["items"], "histories_s": med["histories"],
                     "speedup_items": base["items"] / med["items"], "speedup_histories": base["histories"] / med["histories"],
                     "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                     "valid_ndcg@10": float(ndcg[name].mean()),
                     "paired_vs_torch": paired_bootstrap(ndcg[name], ndcg["torch"])}
    return {"model": enc.path, "threads": threads, "reps": reps, "texts": texts, "users": len(chosen),
            "item_texts": len(item_tok), "runtimes": out}


def markdown(result: dict) -> str:
    """The comparison as a table."""
    rows = [("| runtime | s / item texts | s / history texts | speedup (items, histories) | cosine to torch (min / mean) "
             "| valid NDCG@10 | paired vs torch (95 % CI) |"), "|---|---|---|---|---|---|---|"]
    for name, r in result["runtimes"].items():
        p = r["paired_vs_torch"]
        rows.append(f"| {name} | {r['items_s']:.2f} | {r['histories_s']:.2f} | {r['speedup_items']:.2f}x, "
                    f"{r['speedup_histories']:.2f}x | {r['cosine_min']:.4f} / {r['cosine_mean']:.4f} | "
                    f"{r['valid_ndcg@10']:.4f} | {p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}] |")
    head = (f"{result['texts']} texts per timing, median of {result['reps']}, {result['threads']} threads; "
            f"NDCG on {result['users']} valid users against all {result['item_texts']} items (zero-shot teacher).")
    return head + "\n\n" + "\n".join(rows)
