"""Synthetic catalog: loads through the data stage, sizes and determinism, and the signal is real
(topics predict the next item, users drift, topics shape words, popularity is a power law)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from llmkd.data import build_data
from llmkd.data.synthetic import SyntheticSpec, write_synthetic
from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"items": 3000, "users": 400, "interactions": 12_000, "topics": 30}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A small catalog written in several chunks, and its files read back."""
    out = tmp_path_factory.mktemp("syn")
    write_synthetic(SyntheticSpec(**SMALL, seed=0, chunk_rows=2500, item_chunk_rows=1000), out)
    return out, pd.read_parquet(out / "items.parquet"), pd.read_parquet(out / "interactions.parquet"), \
        pd.read_parquet(out / "topics.parquet")["topic"].to_numpy()


def test_schema_sizes_and_chunks(syn):
    out, items, inter, topic = syn
    assert list(items.columns) == ["item_id", "title", "description"] and len(items) == SMALL["items"]
    assert list(inter.columns) == ["user_id", "item_id", "timestamp"] and len(inter) == SMALL["interactions"]
    assert (inter.dtypes == np.int64).all() and items["item_id"].is_unique
    assert inter["user_id"].nunique() == SMALL["users"] and inter["item_id"].isin(items["item_id"]).all()
    assert inter.groupby("user_id").size().min() >= 3  # every user reaches valid and test
    assert not inter.duplicated(["user_id", "timestamp"]).any()  # no ties inside a user's sequence
    assert len(np.unique(topic)) == SMALL["topics"]
    assert pq.ParquetFile(out / "interactions.parquet").num_row_groups > 1  # written in chunks
    assert pq.ParquetFile(out / "items.parquet").num_row_groups == 3
    assert not list(out.glob("*.tmp"))


def test_loads_through_data_stage(syn):
    out, items, inter, _ = syn
    cfg = load_config(out / "config.yaml")
    data = build_data(cfg.data)
    assert data.num_items == SMALL["items"] and data.num_users == SMALL["users"]
    assert sum(len(t) for t in data.train) + (data.valid_item >= 0).sum() + (data.test_item >= 0).sum() == len(inter)
    assert data.item_texts[0] == f"{items['title'][0]}. {items['description'][0]}"


def test_deterministic_per_seed(syn, tmp_path):
    _out, items, inter, _ = syn
    write_synthetic(SyntheticSpec(**SMALL, seed=0, chunk_rows=2500, item_chunk_rows=1000), tmp_path / "same")
    write_synthetic(SyntheticSpec(**SMALL, seed=1, chunk_rows=2500, item_chunk_rows=1000), tmp_path / "other")
    for name, df in (("items", items), ("interactions", inter)):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "same" / f"{name}.parquet"), df)
        assert not pd.read_parquet(tmp_path / "other" / f"{name}.parquet").equals(df)


def sequences(inter: pd.DataFrame, topic: np.ndarray) -> list[np.ndarray]:
    """Each user's item topics in time order."""
    inter = inter.sort_values(["user_id", "timestamp"], kind="stable")
    return [topic[g.to_numpy()] for _, g in inter.groupby("user_id")["item_id"]]


def topic_hits(inter: pd.DataFrame, topic: np.ndarray) -> tuple[float, float]:
    """How often the last item's topic is among the history's, and the same for another user's last item
    (chance, popularity included)."""
    seqs = sequences(inter, topic)
    hit = np.mean([s[-1] in set(s[:-1]) for s in seqs])
    shuffled = np.random.default_rng(0).permutation([s[-1] for s in seqs])
    return hit, np.mean([t in set(s[:-1]) for t, s in zip(shuffled, seqs)])


def test_next_item_shares_topic_with_history(syn, tmp_path):
    """The last item's topic is among the history's far more often than chance; the same measure finds
    nothing when every interaction ignores the user's topics (explore 1), so it can fail."""
    _, _, inter, topic = syn
    hit, chance = topic_hits(inter, topic)
    assert hit > 0.8 and hit > 2 * chance, (hit, chance)
    write_synthetic(SyntheticSpec(**SMALL, seed=0, explore=1.0), tmp_path / "x")
    hit, chance = topic_hits(pd.read_parquet(tmp_path / "x" / "interactions.parquet"), topic)
    assert abs(hit - chance) < 0.1, (hit, chance)


def test_users_drift(syn):
    """The last item's topic is more often among the 5 most recent items' topics than the 5 first."""
    _, _, inter, topic = syn
    seqs = [s for s in sequences(inter, topic) if len(s) >= 30]
    recent = np.mean([s[-1] in set(s[-6:-1]) for s in seqs])
    early = np.mean([s[-1] in set(s[:5]) for s in seqs])
    assert len(seqs) > 50 and recent > early + 0.15, (recent, early, len(seqs))


def word_overlap(items: pd.DataFrame, topic: np.ndarray) -> tuple[float, float]:
    """Mean Jaccard of two items' word sets: same topic, different topics."""
    words = [set(f"{t} {d}".lower().split()) for t, d in zip(items["title"], items["description"])]

    def jaccard(i, j):
        return len(words[i] & words[j]) / len(words[i] | words[j])

    pairs = np.argsort(topic, kind="stable").reshape(-1, 2)  # neighbours in topic order: same topic
    a, b = np.random.default_rng(0).integers(0, len(words), (2, 4000))
    return (np.mean([jaccard(i, j) for i, j in pairs if topic[i] == topic[j]]),
            np.mean([jaccard(i, j) for i, j in zip(a, b) if topic[i] != topic[j]]))


def test_topics_shape_words(syn, tmp_path):
    """Items of one topic share more words than items of different topics; not so without topic words."""
    _, items, _, topic = syn
    same, diff = word_overlap(items, topic)
    assert same > 2.5 * diff, (same, diff)
    write_synthetic(SyntheticSpec(**SMALL, seed=0, topic_word_share=0.0), tmp_path / "x")
    same, diff = word_overlap(pd.read_parquet(tmp_path / "x" / "items.parquet"), topic)
    assert same < 1.2 * diff, (same, diff)


def head_share(inter: pd.DataFrame, n_items: int, top: float = 0.01) -> float:
    counts = np.sort(np.bincount(inter["item_id"], minlength=n_items))[::-1]
    return counts[: max(1, int(top * n_items))].sum() / counts.sum()


def test_power_law_popularity(syn, tmp_path):
    """The top 1% of items take a large share of interactions (uniform: 1%), and the exponent drives it."""
    _, _, inter, _ = syn
    assert head_share(inter, SMALL["items"]) > 0.15
    write_synthetic(SyntheticSpec(**SMALL, seed=0, zipf=0.0), tmp_path / "flat")
    flat = pd.read_parquet(tmp_path / "flat" / "interactions.parquet")
    assert head_share(flat, SMALL["items"]) < 0.04
    counts = np.sort(np.bincount(inter["item_id"], minlength=SMALL["items"]))[::-1]
    slope = np.polyfit(np.log(np.arange(3, 100)), np.log(counts[2:99]), 1)[0]  # rank-frequency, head
    assert -1.5 < slope < -0.5, slope


def test_bad_spec():
    with pytest.raises(LlmkdError, match="interactions >= users"):
        SyntheticSpec(items=10, users=5, interactions=4)
    with pytest.raises(LlmkdError, match="topics must be in 1..items"):
        SyntheticSpec(items=10, users=5, interactions=10, topics=11)


def test_script(tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, str(ROOT / "scripts/make_synthetic.py"), "--items", "500", "--users", "50",
                    "--interactions", "1000", "--seed", "3", "--out", str(out)], check=True, capture_output=True)
    assert len(pd.read_parquet(out / "interactions.parquet")) == 1000
    assert load_config(out / "config.yaml").data.items == str((out / "items.parquet").resolve())
