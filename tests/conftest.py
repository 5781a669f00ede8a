"""Shared fixtures: a seeded synthetic data set written as files, and tiny random teacher models.

Nothing is downloaded: the BERT and GPT-2 teachers are built from configs with random weights and a
word-level tokenizer made offline with the `tokenizers` library over the synthetic item texts.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import tempfile
import time
import traceback
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Before anything imports transformers / datasets: never touch a hub, keep datasets' cache out of ~.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Tiny models: one thread per process is faster than two and immune to a busy machine (spin waits).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# One datasets cache per pytest-xdist worker (`make test` runs two): workers never write one cache file at once.
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(tempfile.gettempdir()) / "llmkd-tests-hf-datasets"
                                                / os.environ.get("PYTEST_XDIST_WORKER", "main")))

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]

TITLE_WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
]
GENRES = ["drama", "comedy", "horror", "action", "romance"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
PUNCTUATION = ["|", ";", "(", ")", ".", ":", ",", "-"]
TEXT_TEMPLATE = "{title} | {genre}"

N_USERS = 30
N_ITEMS = 40


@dataclass(frozen=True)
class SyntheticFiles:
    """Paths of the synthetic data set and the frames written to them (file order)."""

    interactions: Path
    items: Path
    inter_df: pd.DataFrame
    items_df: pd.DataFrame

    def data_config(self, **kw):
        from llmkd.infra.config import DataConfig

        kw.setdefault("text_template", TEXT_TEMPLATE)
        return DataConfig(source="files", interactions=str(self.interactions), items=str(self.items), **kw)


def make_items(rng: np.random.Generator, n_items: int = N_ITEMS) -> pd.DataFrame:
    """Item ids 101.. (not 0-based, so id -> index mapping matters), 1-4 word titles, one genre."""
    rows = []
    for i in range(n_items):
        words = rng.choice(TITLE_WORDS, size=int(rng.integers(1, 5)), replace=False)
        rows.append({"item_id": 101 + i, "title": " ".join(words), "genre": str(rng.choice(GENRES))})
    return pd.DataFrame(rows)


def make_interactions(rng: np.random.Generator, items: pd.DataFrame, n_users: int = N_USERS) -> pd.DataFrame:
    """Interleaved rows of `n_users` users with small integer timestamps (many ties).

    Users get 1..14 distinct items; users 1 and 2 get 1 and 2 interactions (train only), user 3 gets
    exactly 3, and user 4's last three interactions share one timestamp (ties decide valid/test).
    """
    item_ids = items["item_id"].to_numpy()
    rows = []
    for u in range(1, n_users + 1):
        n = {1: 1, 2: 2, 3: 3}.get(u, int(rng.integers(4, 15)))
        chosen = rng.choice(item_ids, size=n, replace=False)
        ts = rng.integers(1_000, 1_012, size=n)  # 12 distinct values -> frequent ties
        if u == 4:
            ts[-3:] = ts.max() + 1
        rows += [{"user_id": u, "item_id": int(i), "timestamp": int(t)} for i, t in zip(chosen, ts)]
    df = pd.DataFrame(rows)
    return df.iloc[rng.permutation(len(df))].reset_index(drop=True)  # users interleaved in file order


def write_synthetic(folder: Path, seed: int = 0) -> SyntheticFiles:
    """Write interactions.csv + items.csv into `folder` (seeded)."""
    rng = np.random.default_rng(seed)
    items = make_items(rng)
    inter = make_interactions(rng, items)
    folder.mkdir(parents=True, exist_ok=True)
    inter.to_csv(folder / "interactions.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    return SyntheticFiles(folder / "interactions.csv", folder / "items.csv", inter, items)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> SyntheticFiles:
    """The synthetic data set as CSV files (session-wide; do not modify the files)."""
    return write_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def teacher_items(tmp_path, synthetic, monkeypatch):
    """The synthetic data saved under tmp_path/data and a stand-in teacher cache under tmp_path/teacher that
    holds only random item vectors (num_items, 12), for trainer tests of what reads the teacher's item vectors
    (content_init, neighbor_smoothing); returns (data, item vectors)."""
    from types import SimpleNamespace

    from llmkd import distill
    from llmkd.data import build_data, save_data

    data = build_data(synthetic.data_config())
    save_data(data, tmp_path / "data", synthetic.data_config())
    item_emb = np.random.default_rng(0).normal(size=(data.num_items, 12)).astype(np.float32)
    monkeypatch.setattr(distill, "TeacherCache", lambda folder, data, keys=None: SimpleNamespace(item_emb=item_emb))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "meta.json").write_text("{}")  # the student records the cache's fingerprint
    return data, item_emb


@pytest.fixture(scope="session")
def synthetic_data(synthetic):
    """`RecData` built from the synthetic files (session-wide; treat as read-only)."""
    from llmkd.data import build_data

    return build_data(synthetic.data_config())


# ---------------------------------------------------------------- tiny teachers


def _vocab() -> dict[str, int]:
    words = SPECIAL_TOKENS + TITLE_WORDS + GENRES + PUNCTUATION
    return {w: i for i, w in enumerate(words)}


def _tokenizer(bert_style: bool):
    """A word-level fast tokenizer over the synthetic texts; [CLS] ... [SEP] around BERT inputs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_style:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer, 32-d BERT encoder + tokenizer saved in `folder`."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    vocab = _vocab()
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=len(vocab), max_position_embeddings=512, pad_token_id=vocab["[PAD]"])
    BertModel(config).eval().save_pretrained(folder)
    _tokenizer(bert_style=True).save_pretrained(folder)
    return folder


def make_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer, 32-d GPT-2 decoder + tokenizer saved in `folder`."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    vocab = _vocab()
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=512, vocab_size=len(vocab),
                        bos_token_id=vocab["[EOS]"], eos_token_id=vocab["[EOS]"], pad_token_id=vocab["[PAD]"])
    GPT2Model(config).eval().save_pretrained(folder)
    _tokenizer(bert_style=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """Folder with a tiny random BERT (AutoModel / AutoTokenizer loadable offline)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """Folder with a tiny random GPT-2 (AutoModel / AutoTokenizer loadable offline)."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer, 32-d Llama decoder (rotary positions, like SmolLM2) + tokenizer saved in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    vocab = _vocab()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(vocab), max_position_embeddings=512,
                         bos_token_id=vocab["[EOS]"], eos_token_id=vocab["[EOS]"], pad_token_id=vocab["[PAD]"])
    LlamaModel(config).eval().save_pretrained(folder)
    _tokenizer(bert_style=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Folder with a tiny random Llama (AutoModel / AutoTokenizer loadable offline)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


# ---------------------------------------------------------------- a tiny trained run for serving


@pytest.fixture(scope="session")
def served_run(tmp_path_factory, synthetic, tiny_bert):
    """data (10% of items withheld as cold) -> tiny BERT teacher cache -> a text student (content features,
    no KD, 2 epochs) trained in-process: the smallest run a serving bundle and add-items can be made from.
    Returns (cfg, out_dir)."""
    from llmkd import distill
    from llmkd.data import build_data, save_data
    from llmkd.infra.config import Config, DistillConfig, IndexConfig, StudentConfig, TeacherConfig
    from llmkd.teacher import build_teacher_cache

    out = tmp_path_factory.mktemp("served_run")
    cfg = Config(out_dir=str(out), data=synthetic.data_config(max_history=8, cold_items=0.1),
                 teacher=TeacherConfig(model=str(tiny_bert), batch_size=16, max_history_tokens=64),
                 student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0, content_features=True),
                 distill=DistillConfig(name="student_text", alpha=0.0, epochs=2, patience=5, batch_size=16),
                 index=IndexConfig(type="flat"))
    data = build_data(cfg.data)
    save_data(data, out / "data", cfg.data)
    build_teacher_cache(data, cfg.teacher, out / "teacher")
    distill.train(cfg)
    return cfg, out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (servers and torch.distributed rendezvous in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc: subprocess.Popen, answers: Callable[[], bool], timeout_s: float) -> None:
    """Poll `answers()` (e.g. GET /health is 200) until true; fail with the server's stderr if `proc` dies or
    `timeout_s` passes first. A refused or reset connection counts as not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if answers():
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)


def run_in_process(script: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in this interpreter, for tests where the script's code is tested, not a fresh process:
    the script runs as `__main__` (`llmkd.commands.run_in_process`: its `run(main)` turns a user error into one
    line and exit 2) in the repository, with `env` laid over the environment meanwhile. What it prints is
    captured, each warning is printed to its stderr as a fresh interpreter prints it (not kept by pytest), and
    an exception that escapes the script becomes its stderr's traceback and status 1, as in a subprocess."""
    from llmkd.commands import run_in_process as run_script

    out, err = io.StringIO(), io.StringIO()
    env = env or {}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_cwd = Path.cwd()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    os.environ.update(env)  # never emptied meanwhile: other threads may copy it for their subprocesses
    os.chdir(REPO)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            warnings.showwarning = show
            try:
                code = run_script(script, script.name, args)
            except Exception:  # noqa: BLE001 -- what a subprocess would print before exiting 1
                err.write(traceback.format_exc())
                code = 1
    finally:
        os.chdir(saved_cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([str(script), *args], code, out.getvalue(), err.getvalue())
