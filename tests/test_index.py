"""FAISS index: exact flat vs brute force, approximate vs exact, save/load, corrupt files."""

from __future__ import annotations

import dataclasses
import json

import faiss
import numpy as np
import pytest

from llmkd.index import (
    MipsIndex,
    NormAboveMax,
    build_id_index,
    build_index,
    faiss_index,
    load_index,
    save_index,
    search,
)
from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import IndexConfig

D, NB, NQ, K = 16, 2000, 100, 10


@pytest.fixture(scope="module")
def xb_xq():
    """Clustered item vectors (like trained embeddings) and queries near them, float32."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, D))
    xb = centers[rng.integers(0, 20, NB)] + 0.5 * rng.standard_normal((NB, D))
    xq = centers[rng.integers(0, 20, NQ)] + 0.5 * rng.standard_normal((NQ, D))
    return xb.astype(np.float32), xq.astype(np.float32)


def brute_force(xb, xq, k):
    """Exact top-k inner product: scores (nq, k), ids (nq, k)."""
    s = xq.astype(np.float64) @ xb.astype(np.float64).T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def recall_at(ids, ref):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref)])


def test_flat_equals_brute_force(xb_xq):
    xb, xq = xb_xq
    index = build_index(xb, IndexConfig(type="flat"))
    assert index.ntotal == NB and index.d == D
    Dist, I = search(index, xq, K)
    assert Dist.shape == I.shape == (NQ, K) and I.dtype == np.int64
    ref_D, ref_I = brute_force(xb, xq, K)
    np.testing.assert_allclose(Dist, ref_D, rtol=1e-4, atol=1e-4)
    assert recall_at(I, ref_I) == 1.0
    # ids may differ only where scores tie
    np.testing.assert_allclose(np.take_along_axis(xq @ xb.T, I, 1), ref_D, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [
    IndexConfig(type="hnsw", hnsw_m=16, hnsw_ef_search=64),
    IndexConfig(type="ivf", ivf_nlist=32, ivf_nprobe=8),
], ids=["hnsw", "ivf"])
def test_approximate_recall_vs_flat(cfg, xb_xq):
    xb, xq = xb_xq
    _, exact = search(build_index(xb, IndexConfig(type="flat")), xq, K)
    _, approx = search(build_index(xb, cfg), xq, K)
    assert recall_at(approx, exact) > 0.9


def test_ivf_small_catalog_and_k_larger_than_n():
    """Fewer items than lists x 39: nlist shrinks; k > n returns n results."""
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((50, 8)).astype(np.float32)
    index = build_index(xb, IndexConfig(type="ivf", ivf_nlist=32, ivf_nprobe=8))
    assert index.nlist == 1
    _, I = search(index, xb[:3], 100)
    assert I.shape == (3, 50)
    _, ref = brute_force(xb, xb[:3], 50)
    assert recall_at(I, ref) == 1.0


@pytest.mark.parametrize("cfg", [
    IndexConfig(type="flat"),
    IndexConfig(type="hnsw", hnsw_m=8, hnsw_ef_search=77),
    IndexConfig(type="ivf", ivf_nlist=16, ivf_nprobe=5),
    IndexConfig(type="ivfpq", ivf_nlist=16, ivf_nprobe=5, pq_m=4, pq_refine=3),
], ids=lambda c: c.type)
def test_save_load_round_trip(cfg, xb_xq, tmp_path):
    xb, xq = xb_xq
    index = build_index(xb, cfg)
    ids = [f"item{i}" for i in range(NB)]
    save_index(index, ids, tmp_path / "index", cfg, "fp123", "student_kd")
    back, back_ids, meta = load_index(tmp_path / "index")
    assert back_ids == ids
    assert meta["stage"] == "index" and meta["data_fingerprint"] == "fp123" and meta["student"] == "student_kd"
    assert meta["config"]["type"] == cfg.type and meta["ntotal"] == NB and meta["dim"] == D
    if cfg.type == "hnsw":  # search-time parameters survive the file
        assert back.hnsw.efSearch == cfg.hnsw_ef_search
    if cfg.type in ("ivf", "ivfpq"):
        ivf = faiss.extract_index_ivf(faiss_index(back))
        assert ivf.nprobe == cfg.ivf_nprobe and ivf.nlist == cfg.ivf_nlist
    if cfg.type == "ivfpq":
        assert faiss.downcast_index(faiss_index(back)).k_factor == cfg.pq_refine
    a, b = search(index, xq, K), search(back, xq, K)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0])


def test_truncated_index_file(xb_xq, tmp_path):
    xb, _ = xb_xq
    cfg = IndexConfig(type="flat")
    save_index(build_index(xb, cfg), [str(i) for i in range(NB)], tmp_path / "index", cfg, "fp", "s")
    path = tmp_path / "index" / "faiss.index"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LlmkdError, match="faiss.index"):
        load_index(tmp_path / "index")


def test_empty_or_missing_index_file(xb_xq, tmp_path):
    xb, _ = xb_xq
    cfg = IndexConfig(type="flat")
    save_index(build_index(xb, cfg), [str(i) for i in range(NB)], tmp_path / "index", cfg, "fp", "s")
    (tmp_path / "index" / "faiss.index").write_bytes(b"")
    with pytest.raises(LlmkdError, match="faiss.index"):
        load_index(tmp_path / "index")
    (tmp_path / "index" / "faiss.index").unlink()
    with pytest.raises(LlmkdError, match="faiss.index"):
        load_index(tmp_path / "index")


def test_id_map_mismatch(xb_xq, tmp_path):
    xb, _ = xb_xq
    cfg = IndexConfig(type="flat")
    save_index(build_index(xb, cfg), [str(i) for i in range(NB)], tmp_path / "index", cfg, "fp", "s")
    (tmp_path / "index" / "item_ids.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(LlmkdError, match="item_ids.json"):
        load_index(tmp_path / "index")


def test_not_an_index_folder(tmp_path):
    with pytest.raises(LlmkdError, match="index"):
        load_index(tmp_path)


@pytest.fixture(scope="module")
def skewed():
    """Item vectors as a recommender's are: clustered directions plus a shared popularity direction along
    which popular items (heavy-tailed counts) are long, and queries that all lean that way, so a few
    long items top most lists: the inner-product top 10 are not the queries' nearest neighbours."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, D))
    directions = centres[rng.integers(0, 40, 4000)] + 0.5 * rng.standard_normal((4000, D))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    popular = np.zeros(D)
    popular[0] = 1.0
    xb = 0.15 * directions + 0.5 * np.log1p(rng.pareto(1.5, 4000))[:, None] * popular
    xq = popular + 0.5 * centres[rng.integers(0, 40, 200)] + 0.3 * rng.standard_normal((200, D))
    return xb.astype(np.float32), xq.astype(np.float32)


@pytest.mark.parametrize("cfg", [
    IndexConfig(type="hnsw", hnsw_m=16, hnsw_ef_search=32, ip_to_l2=True),
    IndexConfig(type="ivf", ivf_nlist=64, ivf_nprobe=4, ip_to_l2=True),
], ids=["hnsw", "ivf"])
def test_l2_reduction_finds_the_top_inner_products(cfg, skewed):
    """Through the reduction the approximate index reaches the exact top 10 by inner product; on these
    vectors FAISS's own inner-product IVF (same lists visited) misses most of it. Scores are inner products."""
    xb, xq = skewed
    _, ref_I = brute_force(xb, xq, K)
    index = build_index(xb, cfg)
    assert isinstance(index, MipsIndex) and index.d == D and index.ntotal == len(xb)
    Dist, I = search(index, xq, K)
    assert recall_at(I, ref_I) >= 0.95
    if cfg.type == "ivf":
        plain = search(build_index(xb, dataclasses.replace(cfg, ip_to_l2=False)), xq, K)[1]
        assert recall_at(plain, ref_I) < 0.5
    exact = np.take_along_axis(xq.astype(np.float64) @ xb.T.astype(np.float64), I, 1)
    np.testing.assert_allclose(Dist, exact, rtol=1e-4, atol=1e-4 * index.max_norm ** 2)  # inner products, not L2
    assert (np.diff(Dist, axis=1) <= 1e-5).all()  # best first


def test_l2_reduction_layout(skewed, tmp_path):
    """Every stored vector has norm max_norm (the completing coordinate), queries get 0 there, an IVF-PQ gets
    a whole extra sub-vector; the max_norm survives a save / load round trip and refuses longer vectors."""
    xb, xq = skewed
    index = build_index(xb, IndexConfig(type="hnsw", hnsw_m=8, ip_to_l2=True))
    stored = faiss_index(index).reconstruct_n(0, 5)
    assert stored.shape == (5, D + 1)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), index.max_norm, rtol=1e-5)
    assert index.max_norm == pytest.approx(np.linalg.norm(xb, axis=1).max(), rel=1e-6)
    pq = build_index(xb, IndexConfig(type="ivfpq", ivf_nlist=16, pq_m=4, ip_to_l2=True))
    assert faiss_index(pq).d == D + D // 4 and faiss.downcast_index(faiss_index(pq)).pq.M == 5
    cfg = IndexConfig(type="ivf", ivf_nlist=16, ivf_nprobe=16, ip_to_l2=True)
    save_index(build_index(xb, cfg), [str(i) for i in range(len(xb))], tmp_path / "index", cfg, "fp", "s")
    assert (tmp_path / "index" / "faiss.index.json").is_file()
    back = load_index(tmp_path / "index")[0]
    assert isinstance(back, MipsIndex) and back.max_norm == pytest.approx(index.max_norm) and back.d == D
    np.testing.assert_array_equal(search(back, xq, K)[1], brute_force(xb, xq, K)[1])  # every list: exact
    with pytest.raises(NormAboveMax, match="longer than the index's max_norm"):
        back.add(xb[:1] * 1.01 * back.max_norm / np.linalg.norm(xb[0]))
    with pytest.raises(TypeError):  # FAISS functions must be handed faiss_index(index), never the wrapper
        faiss.write_index(back, str(tmp_path / "lost_max_norm.index"))
    assert not isinstance(build_id_index(xb, IndexConfig(type="flat", ip_to_l2=True)), MipsIndex)  # exact: none needed
    assert not isinstance(build_index(xb, IndexConfig(type="hnsw")), MipsIndex)  # the default: FAISS's inner product
