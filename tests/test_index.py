"""FAISS index: exact flat vs brute force, approximate vs exact, save/load, corrupt files."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from llmkd.artifacts import LlmkdError
from llmkd.config import IndexConfig
from llmkd.index import build_index, load_index, save_index, search

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
        ivf = faiss.extract_index_ivf(back)
        assert ivf.nprobe == cfg.ivf_nprobe and ivf.nlist == cfg.ivf_nlist
    if cfg.type == "ivfpq":
        assert faiss.downcast_index(back).k_factor == cfg.pq_refine
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
