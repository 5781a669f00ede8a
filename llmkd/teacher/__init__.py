"""The teacher: a HuggingFace language model that embeds item texts and user histories.

Encoders (BERT-style) use masked mean pooling, decoders (GPT-style) the last token's hidden state;
vectors are L2-normalised, so a user-item score is a cosine in [-1, 1]. Texts are encoded in batches
of similar token length (sorted), under `torch.inference_mode`.

Artifact `teacher/` (a cache, reused while model, data and teacher config are unchanged):
    meta.json                 stage, config, data fingerprint, model fingerprint, timing
    embeddings.safetensors    item_emb (n_items, d) float32;
                              for each state in STATES: user_{state} (n_users, d) float32;
                              positions: pos_user (M,) int64, pos_cut (M,) int64, user_pos (M, d) float16 =
                              the user vector of history train[u][:cut] (every user's 'kd' cut, plus every
                              `position_stride`-th cut before it), the KD targets at many positions
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from llmkd.data import RecData
from llmkd.infra.artifacts import (
    LlmkdError,
    StageTimer,
    atomic_dir,
    new_meta,
    read_meta,
    reading,
    write_json,
)
from llmkd.infra.config import TeacherConfig
from llmkd.infra.lineage import check_lineage, files_load, input_record
from llmkd.infra.locks import main_process_lock
from llmkd.teacher.models import (  # noqa: F401 -- re-exported: callers import them from the teacher
    PACKAGED,
    cache_root,
    convert_gguf,
    is_decoder,
    learned_positions,
    model_fingerprint,
    packaged_path,
    resolve_model_path,
)
from llmkd.teacher.shards import Part, encode_parts, remove_shards

STATES = {
    "kd": "history = train[:-1]; its next item (the last train item) is the KD positive",
    "valid": "history = train; scores the valid item",
    "test": "history = train + valid; scores the test item",
}


class TextEncoder:
    """Embeds texts with a HF model (+ optional PEFT adapter): `encode(texts) -> (n, d) float32`, L2-normalised."""

    def __init__(self, model: str = "minilm", pooling: str = "auto", batch_size: int = 64,
                 device: str | None = None, adapter: str | Path | None = None) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.path = resolve_model_path(model)
        local = Path(self.path)
        if not local.is_dir() and (local.anchor or local.exists()):
            raise LlmkdError(f"teacher.model: {self.path} {'is not a folder' if local.exists() else 'does not exist'}")
        try:
            config = AutoConfig.from_pretrained(self.path)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path, config=config)
        except Exception as e:  # missing, truncated or foreign files raise OSError, ValueError, SafetensorError, ...
            where = "" if local.is_dir() else "no such local folder, nor a Hub model id available offline: "
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LlmkdError(f"teacher.model {self.path}: could not load a HF model ({where}{detail})") from None
        self.pooling = pooling if pooling != "auto" else ("last" if is_decoder(config) else "mean")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "left" if self.pooling == "last" else "right"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if adapter is not None:
            self.model = load_adapter(self.model, adapter, self.path).merge_and_unload()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model.to(self.device, dtype=dtype).eval()
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, d) hidden states, (B, L) mask -> (B, d) pooled, L2-normalised."""
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        else:  # left padding: the last position is each row's last real token
            pooled = hidden[:, -1]
        return F.normalize(pooled.float(), dim=-1)

    def tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids per text, truncated; an empty text keeps one token (EOS or PAD)."""
        enc = self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        longest, limit = max(map(len, enc), default=0), learned_positions(self.model.config)
        if limit is not None and longest > limit:
            raise LlmkdError(f"{self.path}: a text of {longest} tokens under a budget of {max_length} "
                             "(teacher.max_item_tokens / teacher.max_history_tokens) is longer than the model's "
                             f"{limit} positions; set the budget to {limit} or less")
        filler = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.pad_token_id
        return [ids if ids else [filler] for ids in enc]

    def embed(self, token_ids: list[list[int]]) -> torch.Tensor:
        """One padded batch -> (B, d) pooled, L2-normalised (with autograd when enabled)."""
        batch = self.tokenizer.pad({"input_ids": token_ids}, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.pooling == "last":  # left padding must not shift absolute / rotary positions
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        hidden = self.model(**batch).last_hidden_state  # (B, L, d)
        return self.pool(hidden, batch["attention_mask"])

    def encode(self, texts: list[str], max_length: int = 128, desc: str | None = None) -> np.ndarray:
        """Embed `texts` -> (n, d) float32, batches bucketed by token length."""
        return self.encode_tokens(self.tokenize(texts, max_length), desc=desc)

    @torch.inference_mode()
    def encode_tokens(self, enc: list[list[int]], desc: str | None = None,
                      embed: Callable[[list[list[int]]], torch.Tensor] | None = None) -> np.ndarray:
        """Token ids -> (n, d) float32 through `embed` (default `self.embed`; another runtime's, e.g. ONNX
        Runtime, in `llmkd.experiments.teacher_runtime`), batches bucketed by token length."""
        embed = embed or self.embed
        order = np.argsort([len(ids) for ids in enc], kind="stable")
        out = np.zeros((len(enc), self.dim), dtype=np.float32)
        for start in tqdm(range(0, len(enc), self.batch_size), desc=desc, disable=desc is None):
            idx = order[start : start + self.batch_size]
            out[idx] = embed([enc[i] for i in idx]).cpu().numpy()
        return out


def load_adapter(model, adapter: str | Path, base_path: str):
    """Wrap `model` with the PEFT adapter in `adapter`; refuse one made for another base model."""
    from peft import PeftConfig, PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise LlmkdError(f"teacher.adapter {adapter}: no adapter_config.json (run scripts/finetune_teacher.py)")
    made_for = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    if made_for and Path(made_for).resolve() != Path(base_path).resolve() and made_for != base_path:
        raise LlmkdError(f"teacher.adapter {adapter}: made for base model {made_for}, not {base_path}")
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as e:
        raise LlmkdError(f"teacher.adapter {adapter}: does not fit {base_path} ({str(e).splitlines()[0][:200]})") from None


def history_text(item_texts: list[str], history: np.ndarray, template: str, separator: str,
                 max_items: int = 0) -> str:
    """A user's history as text, most recent item first (token truncation then drops the oldest)."""
    recent = history[::-1][:max_items] if max_items else history[::-1]
    return template.replace("{items}", separator.join(item_texts[i] for i in recent))


def item_prompts(item_texts: list[str], cfg: TeacherConfig) -> list[str]:
    """Every item's text inside `teacher.item_template`."""
    return [cfg.item_template.replace("{text}", t) for t in item_texts]


def user_prompt(item_texts: list[str], history: np.ndarray, cfg: TeacherConfig) -> str:
    """A history rendered the way the teacher (and its LoRA tuning) reads it."""
    return history_text(item_texts, history, cfg.history_template, cfg.history_separator, cfg.max_history_items)


def adapter_path(cfg: TeacherConfig, out_dir: str | Path) -> Path | None:
    """`teacher.adapter` resolved: relative paths are taken relative to the run's out_dir."""
    if cfg.adapter is None:
        return None
    p = Path(cfg.adapter)
    return p if p.is_absolute() else Path(out_dir) / p


def tuned_adapter(adapter: Path | None) -> tuple[Path | None, str]:
    """`adapter` if its tuning beat the zero-shot teacher on valid (its meta.json says so), else None; and why.

    LoRA starts as the identity, so an adapter whose tuning never beat step 0 is the zero-shot model."""
    if adapter is None:
        return None, "no adapter configured"
    meta = read_meta(adapter, "teacher_lora")
    best, zero = meta["best_valid_ndcg_at_10"], meta["zero_shot_valid_ndcg_at_10"]
    if best > zero:
        return adapter, f"LoRA adapter used: valid NDCG@10 {best:.4f} vs zero-shot {zero:.4f}"
    return None, f"LoRA adapter not used: it did not beat the zero-shot teacher on valid ({best:.4f} vs {zero:.4f})"


def state_histories(data: RecData) -> dict[str, list[np.ndarray]]:
    """Each user's history at every teacher state (see STATES)."""
    return {
        "kd": [t[:-1] for t in data.train],
        "valid": [data.history(u, "valid") for u in range(data.num_users)],
        "test": [data.history(u, "test") for u in range(data.num_users)],
    }


def kd_cuts(data: RecData, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(user, cut) pairs the teacher encodes for KD: history train[u][:cut] predicts train[u][cut].

    Each user with >= 2 train items gets the 'kd' cut (len - 1); stride > 0 adds every stride-th cut
    before it, down to 1. Returns users (M,) and cuts (M,) int64, sorted by user then cut.
    """
    users, cuts = [], []
    for u, seq in enumerate(data.train):
        c = list(range(len(seq) - 1, 0, -stride)) if stride else ([len(seq) - 1] if len(seq) > 1 else [])
        users += [u] * len(c)
        cuts += c[::-1]
    return np.asarray(users, dtype=np.int64), np.asarray(cuts, dtype=np.int64)


def encode_users(encoder: TextEncoder, data: RecData, item_emb: np.ndarray, histories: list[np.ndarray],
                 cfg: TeacherConfig, desc: str) -> np.ndarray:
    """User vectors (n_users, d) float32 for one state: history text, or mean of history item vectors."""
    if cfg.user_mode == "mean_items":
        out = np.stack([item_emb[h].mean(0) if len(h) else np.zeros(item_emb.shape[1], np.float32) for h in histories])
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    texts = [user_prompt(data.item_texts, h, cfg) for h in histories]
    return encoder.encode(texts, cfg.max_history_tokens, desc=desc)


# Teacher settings that change nothing in a cache: the batch and shard sizes, the adapter's path (its contents
# are keyed by fingerprint) and `top_k` (older versions cached top-K lists, which nothing reads now).
NOT_CACHED = ("batch_size", "shard_size", "adapter", "top_k")


def cache_key_config(config: dict) -> dict:
    """The teacher settings (a `TeacherConfig` as a dict) a cache depends on: all but `NOT_CACHED`."""
    return {k: v for k, v in config.items() if k not in NOT_CACHED}


def text_parts(data: RecData, cfg: TeacherConfig, pos_user: np.ndarray, pos_cut: np.ndarray) -> list[Part]:
    """What the teacher encodes from text: items, then user histories at every state (and KD positions),
    each rendered a shard at a time."""
    items = Part("item_emb", data.num_items,
                 lambda lo, hi: item_prompts(data.item_texts[lo:hi], cfg), cfg.max_item_tokens)
    if cfg.user_mode != "text":
        return [items]
    history = {"kd": lambda u: data.train[u][:-1], "valid": lambda u: data.history(u, "valid"),
               "test": lambda u: data.history(u, "test")}

    def users(state: str) -> Callable[[int, int], list[str]]:
        return lambda lo, hi: [user_prompt(data.item_texts, history[state](u), cfg) for u in range(lo, hi)]

    parts = [items, *(Part(f"user_{s}", data.num_users, users(s), cfg.max_history_tokens) for s in STATES)]
    if cfg.position_stride:
        positions = lambda lo, hi: [user_prompt(data.item_texts, data.train[u][:c], cfg)
                                    for u, c in zip(pos_user[lo:hi], pos_cut[lo:hi])]
        parts.append(Part("user_pos", len(pos_user), positions, cfg.max_history_tokens))
    return parts


def build_teacher_cache(data: RecData, cfg: TeacherConfig, folder: str | Path, force: bool = False,
                        adapter: Path | None = None, also: list[Path] = ()) -> dict:
    """Encode items and users at every state (and KD positions). Reuse `folder` when its inputs (model and
    adapter contents, data, the settings outside `NOT_CACHED`) are unchanged, or copy a matching cache
    from `also` (e.g. the zero-shot cache when the adapter is not used). Under `accelerate launch` the
    processes share the encoding (`llmkd.teacher.shards`); the main process holds the lock and writes."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    folder = Path(folder)
    with main_process_lock(state, folder):
        return _build(data, cfg, folder, force, adapter, also, state)


def _build(data: RecData, cfg: TeacherConfig, folder: Path, force: bool, adapter: Path | None, also: list[Path],
           state) -> dict:
    """`build_teacher_cache`, under the lock."""
    from accelerate.utils import broadcast_object_list

    path = resolve_model_path(cfg.model)
    key = {"config": cache_key_config(asdict(cfg)), "model_path": path, "model_fingerprint": model_fingerprint(path),
           "adapter_fingerprint": model_fingerprint(str(adapter)) if adapter else None,
           "data_fingerprint": data.fingerprint}

    def matches(candidate: Path) -> dict | None:
        if not (candidate / "meta.json").is_file() or not (candidate / "embeddings.safetensors").is_file():
            return None
        if not files_load(candidate):  # truncated or corrupt: rebuilt, never reused
            return None
        meta = read_meta(candidate, "teacher")
        found = {**meta, "config": cache_key_config(meta.get("config") or {})}
        return meta if all(found.get(k) == v for k, v in key.items()) else None

    def decide() -> dict | None:
        if adapter is not None and (Path(adapter) / "meta.json").is_file():  # tuned here: not on other data
            check_lineage(adapter, folder.parent, data.fingerprint)
        if force:
            return None
        if (meta := matches(folder)) is not None:
            return {"reused": True, **meta}
        for other in also:
            if Path(other) != folder and (meta := matches(Path(other))) is not None:
                with atomic_dir(folder) as tmp:
                    shutil.copytree(other, tmp, dirs_exist_ok=True)
                return {"reused": True, "copied_from": str(other), **meta}
        return None

    decision: list = [None]
    if state.is_main_process:
        try:
            decision[0] = decide()
        except LlmkdError as e:
            decision[0] = {"error": str(e)}
    if state.num_processes > 1:
        broadcast_object_list(decision)
    if decision[0] is not None:
        if "error" in decision[0]:
            raise LlmkdError(decision[0]["error"])
        return decision[0]
    with StageTimer() as timer:
        encoder = TextEncoder(cfg.model, cfg.pooling, cfg.batch_size, device=str(state.device), adapter=adapter)
        pos_user, pos_cut = kd_cuts(data, cfg.position_stride)
        arrays, shards = encode_parts(encoder, text_parts(data, cfg, pos_user, pos_cut), folder, key,
                                      cfg.shard_size, state, force)
        if state.is_main_process:
            if cfg.user_mode != "text":  # means of item vectors: no text to encode
                hists = {**state_histories(data), "pos": [data.train[u][:c] for u, c in zip(pos_user, pos_cut)]}
                for s, h in hists.items():
                    arrays[f"user_{s}"] = encode_users(encoder, data, arrays["item_emb"], h, cfg, desc=None)
            if not cfg.position_stride:  # the 'kd' cut of each user is the 'kd' state
                arrays["user_pos"] = arrays["user_kd"][pos_user]
            arrays = {"item_emb": arrays["item_emb"], **{f"user_{s}": arrays[f"user_{s}"] for s in STATES},
                      "pos_user": pos_user, "pos_cut": pos_cut, "user_pos": arrays["user_pos"].astype(np.float16)}
    meta = new_meta("teacher", asdict(cfg), data.fingerprint, model_path=path,
                    model_fingerprint=key["model_fingerprint"], adapter=str(adapter) if adapter else None,
                    adapter_fingerprint=key["adapter_fingerprint"], pooling=encoder.pooling,
                    inputs={"adapter": input_record(folder.parent, adapter)}  # one from elsewhere: untracked
                    if adapter and (Path(adapter) / "meta.json").is_file() else {},
                    num_parameters=encoder.num_parameters(), dim=encoder.dim, states=STATES, shards=shards,
                    timing=timer.as_dict())
    if state.is_main_process:
        with atomic_dir(folder) as tmp:
            save_file(arrays, str(tmp / "embeddings.safetensors"))
            write_json(tmp / "meta.json", meta)
        remove_shards(folder)
    state.wait_for_everyone()
    return {"reused": False, **meta}


class TeacherCache:
    """A loaded `teacher/` artifact: item vectors, user vectors per state and at KD positions."""

    def __init__(self, folder: str | Path, data: RecData | None = None, keys: tuple[str, ...] | None = None) -> None:
        """`keys`: read only these arrays (those the file holds); the others stay on disk."""
        self.folder = Path(folder)
        self.meta = read_meta(self.folder, "teacher")
        if data is not None:
            check_lineage(self.folder, self.folder.parent, data.fingerprint)
        path = self.folder / "embeddings.safetensors"
        with reading(path, "teacher cache"):
            if keys is None:
                self.arrays = {k: torch.as_tensor(v) for k, v in load_file(str(path)).items()}
            else:
                with safe_open(str(path), framework="numpy") as f:
                    self.arrays = {k: torch.as_tensor(f.get_tensor(k)) for k in f.keys() if k in keys}

    @property
    def item_emb(self) -> torch.Tensor:
        """(n_items, d) float32, L2-normalised."""
        return self.arrays["item_emb"]

    def scorer(self):
        """Full-catalog cosine scores for evaluation: (users, split) -> (B, n_items)."""
        return lambda users, split: self.arrays[f"user_{split}"][torch.as_tensor(users)] @ self.item_emb.T

    def describe(self) -> str:
        return json.dumps({k: self.meta[k] for k in ("model_path", "pooling", "num_parameters")})
