"""A large synthetic catalog whose item text carries real signal, written as bring-your-own-data files.

How the text relates to the interactions (the point of the data set):

- Each item belongs to one latent **topic** (topics are balanced; `topics` defaults to sqrt(items) / 2).
- Its text is `title` (4 words) and `description` (16 words) of invented words. Each word comes from the
  item's topic vocabulary (40 words per topic, uniform) with probability `topic_word_share` (0.6), otherwise
  from 400 shared words drawn with Zipf frequencies, which behave like stop words. So items of one topic
  share words and items of different topics share mostly the shared words; the topic itself is never
  written out (no 'category' column to copy).
- Each user prefers `topics_per_user` (3) topics with Dirichlet weights and **drifts**: over their
  sequence the weights move linearly from an early mix of topics 1..k to a late mix of topics 2..k+1,
  so one topic fades out and a new one fades in. With probability `explore` (0.1) an interaction
  ignores the user's topics.
- Within the chosen topic (or the whole catalog, when exploring) the item is drawn by **popularity**,
  a power law: the item of popularity rank r has weight r^-zipf (zipf 1.0; ranks are a random
  permutation, independent of topic).
- Users' activity is log-normal (at least 3 interactions each when interactions >= 3 x users), times
  are Unix seconds with exponential gaps (user-specific mean, ~1 day).

So a text model can learn which words go together in users' histories and predict the *topic* of the
next item (and, from recent items, the drift), while *which* item inside the topic depends on popularity
and ids. `topics.parquet` holds the ground truth (item_id, topic) for tests and analysis; it is not an
input of the pipeline.

Files (`write_synthetic`): `items.parquet` (item_id int64, title, description), `interactions.parquet`
(user_id int64, item_id int64, timestamp int64), `topics.parquet`, `config.yaml` (a `data:` section for
`scripts/prepare_data.py --config`), `meta.json` (the spec, timing). Everything is vectorised numpy and
written in chunks (`chunk_rows` interactions, `item_chunk_rows` items per Parquet row group), so memory stays bounded by the per-user and
per-item arrays plus one chunk, whatever the number of interactions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmkd.infra.artifacts import LlmkdError

CONSONANTS = list("bcdfghjklmnprstvz") + ["ch", "sh", "th"]
VOWELS = list("aeiou") + ["ai", "ou"]
START_TIME = 1_600_000_000  # 2020-09-13, Unix seconds
SPAN_S = 2 * 365 * 86_400


@dataclass
class SyntheticSpec:
    """Sizes and the knobs of the generative story in the module docstring."""

    items: int
    users: int
    interactions: int
    seed: int = 0
    topics: int | None = None
    topics_per_user: int = 3
    topic_words: int = 40
    shared_words: int = 400
    title_words: int = 4
    description_words: int = 16
    topic_word_share: float = 0.6
    zipf: float = 1.0
    explore: float = 0.1
    chunk_rows: int = 1_000_000
    item_chunk_rows: int = 100_000

    def __post_init__(self) -> None:
        if self.topics is None:
            self.topics = max(2, round(np.sqrt(self.items) / 2))
        if not (self.items >= 1 and self.users >= 1 and self.interactions >= self.users):
            raise LlmkdError(f"synthetic: need items >= 1, users >= 1 and interactions >= users (every user "
                             f"interacts); got {self.items}, {self.users}, {self.interactions}")
        if not 1 <= self.topics <= self.items:
            raise LlmkdError(f"synthetic: topics must be in 1..items, got {self.topics}")
        if not (0 <= self.topic_word_share <= 1 and 0 <= self.explore <= 1 and self.zipf >= 0):
            raise LlmkdError("synthetic: topic_word_share and explore must be in [0, 1], zipf >= 0")


def vocabulary(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct invented 3-syllable words, (n,) str."""
    syl = np.array([c + v for c in CONSONANTS for v in VOWELS])
    if n > len(syl) ** 3:
        raise LlmkdError(f"synthetic: {n} words asked, at most {len(syl) ** 3} can be made")
    code = rng.choice(len(syl) ** 3, size=n, replace=False)
    a, b, c = code // len(syl) ** 2, code // len(syl) % len(syl), code % len(syl)
    return np.char.add(np.char.add(syl[a], syl[b]), syl[c])


def item_structure(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Balanced topics (n_items,) int64 (every topic non-empty) and power-law popularity (n_items,) float64."""
    topic = rng.permutation(np.arange(spec.items) % spec.topics)
    rank = rng.permutation(spec.items) + 1
    return topic, rank.astype(np.float64) ** -spec.zipf


def zipf_probabilities(n: int, a: float = 1.0) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -a
    return p / p.sum()


def item_texts(topic: np.ndarray, spec: SyntheticSpec, vocab: np.ndarray, rng: np.random.Generator) -> tuple:
    """(title, description) pyarrow string arrays for items of the given topics (c,) int64."""
    c, length = len(topic), spec.title_words + spec.description_words
    own = rng.random((c, length)) < spec.topic_word_share
    topic_word = spec.shared_words + topic[:, None] * spec.topic_words + rng.integers(0, spec.topic_words, (c, length))
    shared_word = rng.choice(spec.shared_words, size=(c, length), p=zipf_probabilities(spec.shared_words))
    words = np.where(own, topic_word, shared_word)
    return (join_words(vocab, words[:, : spec.title_words], capitalize=True),
            join_words(vocab, words[:, spec.title_words :]))


def join_words(vocab: np.ndarray, words: np.ndarray, capitalize: bool = False) -> pa.Array:
    """Rows of word indices (c, L) -> c space-joined strings, in Arrow's C++ kernels (no Python loop)."""
    c, length = words.shape
    flat = pa.array(vocab).take(pa.array(words.ravel()))
    lists = pa.ListArray.from_arrays(pa.array(np.arange(c + 1, dtype=np.int32) * length), flat)
    text = pc.binary_join(lists, " ")
    return pc.utf8_capitalize(text) if capitalize else text


def user_structure(spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per user: interaction counts (sum = interactions), k+1 topics, early / late topic weights, start
    time and mean gap between interactions."""
    u, k = spec.users, spec.topics_per_user
    floor = min(3, spec.interactions // u)
    activity = rng.lognormal(0.0, 1.0, u)
    counts = floor + rng.multinomial(spec.interactions - floor * u, activity / activity.sum())
    return {"counts": counts.astype(np.int64),
            "topics": rng.integers(0, spec.topics, (u, k + 1)),
            "early": rng.dirichlet(np.ones(k), u), "late": rng.dirichlet(np.ones(k), u),
            "start": START_TIME + rng.integers(0, SPAN_S, u), "gap": 86_400 * rng.lognormal(0.0, 1.0, u)}


class TopicSampler:
    """Draws items by popularity within a topic (or the whole catalog) with one searchsorted per batch."""

    def __init__(self, topic: np.ndarray, weight: np.ndarray, n_topics: int):
        self.order = np.argsort(topic, kind="stable")
        self.cum = np.cumsum(weight[self.order])
        ends = np.searchsorted(topic[self.order], np.arange(n_topics), side="right")
        self.hi = self.cum[ends - 1]
        self.lo = np.concatenate([[0.0], self.hi[:-1]])

    def draw(self, topics: np.ndarray | None, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n,) int64 items: popularity-weighted within `topics` (n,), or over all items when None."""
        lo, hi = (0.0, self.cum[-1]) if topics is None else (self.lo[topics], self.hi[topics])
        pos = np.searchsorted(self.cum, lo + rng.random(n) * (hi - lo), side="right")
        return self.order[np.minimum(pos, len(self.order) - 1)]


def interaction_chunk(users: np.ndarray, st: dict, sampler: TopicSampler, spec: SyntheticSpec,
                      rng: np.random.Generator) -> pa.Table:
    """All interactions of `users` (a contiguous range, (c,) int64), sorted by time: the drifting topic
    mix, popularity within topic, exploration, timestamps."""
    counts = st["counts"][users]
    user = np.repeat(users, counts)
    pos = np.arange(len(user)) - np.repeat(np.cumsum(counts) - counts, counts)
    frac = (pos / np.maximum(counts[user - users[0]] - 1, 1))[:, None]  # 0 at a user's first item, 1 at the last
    zero = np.zeros((len(user), 1))
    mix = (1 - frac) * np.hstack([st["early"][user], zero]) + frac * np.hstack([zero, st["late"][user]])
    slot = (rng.random((len(user), 1)) > np.cumsum(mix, axis=1)[:, :-1]).sum(axis=1)
    item = sampler.draw(st["topics"][user, slot], rng, len(user))
    explore = rng.random(len(user)) < spec.explore
    item[explore] = sampler.draw(None, rng, int(explore.sum()))
    gaps = np.ceil(rng.exponential(st["gap"][user])).astype(np.int64)  # >= 1 s: no ties within a user
    csum, starts = np.cumsum(gaps), np.cumsum(counts) - counts
    time_ = st["start"][user] + csum - np.repeat(csum[starts] - gaps[starts], counts)  # per-user running sum
    order = np.argsort(time_, kind="stable")
    return pa.table({"user_id": user[order], "item_id": item[order], "timestamp": time_[order]})


def user_chunks(counts: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """Contiguous user ranges [a, b) of about `rows` interactions each (at least one user each)."""
    edges = np.searchsorted(np.cumsum(counts), np.arange(rows, counts.sum(), rows), side="left") + 1
    edges = np.unique(np.concatenate([[0], np.minimum(edges, len(counts)), [len(counts)]]))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def write_synthetic(spec: SyntheticSpec, out: str | Path) -> dict:
    """Write the files of the module docstring to `out`; returns meta (spec, sizes, seconds per part).
    Each file is written under a temporary name and renamed, so a killed run leaves no half file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rng_items, rng_users = (np.random.default_rng([spec.seed, s]) for s in (0, 1))
    vocab = vocabulary(spec.shared_words + spec.topics * spec.topic_words, rng_items)
    topic, weight = item_structure(spec, rng_items)
    with _writer(out / "items.parquet") as write:
        for i, a in enumerate(range(0, spec.items, spec.item_chunk_rows)):  # (c, 20) words a chunk
            ids = np.arange(a, min(a + spec.item_chunk_rows, spec.items), dtype=np.int64)
            title, desc = item_texts(topic[ids], spec, vocab, np.random.default_rng([spec.seed, 2, i]))
            write(pa.table({"item_id": ids, "title": title, "description": desc}))
    with _writer(out / "topics.parquet") as write:
        write(pa.table({"item_id": np.arange(spec.items, dtype=np.int64), "topic": topic}))
    t_items = time.perf_counter() - t0
    st = user_structure(spec, rng_users)
    sampler = TopicSampler(topic, weight, spec.topics)
    with _writer(out / "interactions.parquet") as write:
        for i, (a, b) in enumerate(user_chunks(st["counts"], spec.chunk_rows)):
            rng = np.random.default_rng([spec.seed, 3, i])
            write(interaction_chunk(np.arange(a, b, dtype=np.int64), st, sampler, spec, rng))
    meta = {"spec": asdict(spec), "vocabulary": len(vocab),
            "seconds": {"items": round(t_items, 3), "interactions": round(time.perf_counter() - t0 - t_items, 3)}}
    (out / "config.yaml").write_text(data_config(out), encoding="utf-8")
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def data_config(out: Path) -> str:
    """A config (YAML) whose `data:` section reads the files of `out` with the data stage."""
    return (f"# written by scripts/make_synthetic.py; lay stage settings over it with --set / --recipe\n"
            f"out_dir: {out.resolve() / 'run'}\ndata:\n  source: files\n"
            f"  interactions: {out.resolve() / 'interactions.parquet'}\n  items: {out.resolve() / 'items.parquet'}\n"
            "  text_template: \"{title}. {description}\"\n")


class _writer:
    """Context manager: a Parquet file written table by table (one row group each) under a temporary
    name, renamed into place on success."""

    def __init__(self, path: Path):
        self.path, self.tmp, self.writer = path, path.with_name(path.name + ".tmp"), None

    def __enter__(self):
        return self.write

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)

    def __exit__(self, exc_type, *_):
        if self.writer is not None:
            self.writer.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()
