"""ANN sweep: recall@k against exact search, each index type vs brute force, the picker, the fragment."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from llmkd.evaluation.ann import clustered_vectors, default_grid, exact_knn, pick, recall_at_k, recipe_fragment, sweep
from llmkd.index import MipsIndex, NormAboveMax, build_id_index, build_index, ivf_nlist, search
from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import IndexConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
D, NB, NQ, K = 16, 3000, 60, 10


@pytest.fixture(scope="module")
def xb_xq():
    x = clustered_vectors(NB + NQ, D, 30, seed=0)
    return x[:NB], x[NB:]


def brute_force(xb, xq, k):
    """Exact top-k inner product in float64 numpy: (nq, k) ids."""
    return np.argsort(-(xq.astype(np.float64) @ xb.astype(np.float64).T), axis=1, kind="stable")[:, :k]


def test_recall_hand_computed():
    gt = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(np.array([[3, 2, 9], [7, 8, 9]]), gt, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert recall_at_k(np.array([[3, 1, 2], [6, 5, 4]]), gt, 3) == 1.0  # order within the top k is free
    assert recall_at_k(np.array([[1, 1, 1], [4, -1, -1]]), gt, 3) == pytest.approx((1 / 3 + 1 / 3) / 2)  # no double counting
    # only the first k columns of each count: the 4th retrieved item does not rescue a miss
    assert recall_at_k(np.array([[9, 9, 9, 1]]), np.array([[1, 2, 3, 4]]), 3) == 0.0


def test_exact_knn_and_flat_equal_brute_force(xb_xq):
    xb, xq = xb_xq
    ref = brute_force(xb, xq, K)
    _, I = exact_knn(xb, xq, K)
    np.testing.assert_array_equal(I, ref)
    _, I = search(build_id_index(xb, IndexConfig(type="flat")), xq, K)
    np.testing.assert_array_equal(I, ref)


@pytest.mark.parametrize("cfg, floor", [
    (IndexConfig(type="ivf", ivf_nlist=40, ivf_nprobe=40), 1.0),  # every list visited: exact
    (IndexConfig(type="hnsw", hnsw_m=16, hnsw_ef_search=400), 0.99),
    (IndexConfig(type="ivfpq", ivf_nlist=40, ivf_nprobe=40, pq_m=8, pq_refine=50), 0.99),  # re-ranked exactly
    (IndexConfig(type="ivfpq", ivf_nlist=40, ivf_nprobe=40, pq_m=8), 0.5),  # codes only: approximate
], ids=["ivf-all-lists", "hnsw-wide", "ivfpq-refined", "ivfpq-codes"])
def test_each_type_against_brute_force(cfg, floor, xb_xq):
    """Each type in an IndexIDMap returns row ids; where it searches everything exactly, the exact top-k."""
    xb, xq = xb_xq
    ref = brute_force(xb, xq, K)
    _, I = search(build_id_index(xb, cfg), xq, K)
    assert I.min() >= 0 and I.max() < NB
    assert recall_at_k(I, ref, K) >= floor
    if floor == 1.0:
        np.testing.assert_array_equal(I, ref)


@pytest.mark.parametrize("ip_to_l2", [True, False], ids=["l2-reduction", "inner-product"])
@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_id_index_appends_new_items(kind, ip_to_l2, xb_xq):
    """The serving bundle appends items with add_with_ids: each type returns them under their ids, as
    exact search over old + new items does (IVF visiting every list exactly). The L2 reduction refuses a
    vector longer than those it was built for (the bundle then rebuilds), and takes any other."""
    xb, xq = xb_xq
    index = build_id_index(xb[:2000], IndexConfig(type=kind, ivf_nlist=20, ivf_nprobe=20, pq_m=8, pq_refine=50,
                                                  hnsw_ef_search=400, ip_to_l2=ip_to_l2))
    new = xb[2000:] * 2  # larger norms: often on top
    if ip_to_l2:
        assert isinstance(index, MipsIndex)
        with pytest.raises(NormAboveMax, match="longer than the index's max_norm"):
            index.add_with_ids(new, np.arange(2000, NB, dtype=np.int64))
        assert index.ntotal == 2000
        new = new * (index.max_norm / np.linalg.norm(new, axis=1).max())  # the longest reaches max_norm
    index.add_with_ids(new, np.arange(2000, NB, dtype=np.int64))
    ref = brute_force(np.vstack([xb[:2000], new]), xq, K)
    assert (ref >= 2000).mean() > 0.3
    _, I = search(index, xq, K)
    assert recall_at_k(I, ref, K) >= (1.0 if kind == "ivf" else 0.97)


def test_ivfpq_codes_lose_recall_that_refine_restores(xb_xq):
    """The sweep must be able to tell settings apart: raw PQ codes are measurably worse than exact."""
    xb, xq = xb_xq
    ref = brute_force(xb, xq, K)
    codes = recall_at_k(search(build_index(xb, IndexConfig(type="ivfpq", ivf_nlist=40, ivf_nprobe=40, pq_m=4)), xq, K)[1], ref, K)
    refined = recall_at_k(search(build_index(xb, IndexConfig(type="ivfpq", ivf_nlist=40, ivf_nprobe=40, pq_m=4,
                                                              pq_refine=50)), xq, K)[1], ref, K)
    assert codes < 0.9 < refined


def test_nlist_rule():
    assert ivf_nlist(100_000, IndexConfig()) == 1265  # 4 sqrt(n)
    assert ivf_nlist(10_000, IndexConfig()) == 256  # 4 sqrt(n) = 400 > n // 39
    assert ivf_nlist(1_000_000, IndexConfig()) == 4000
    assert ivf_nlist(1_682, IndexConfig()) == 43  # capped at n // 39
    assert ivf_nlist(10_000, IndexConfig(ivf_nlist=100)) == 100
    assert ivf_nlist(10, IndexConfig(ivf_nlist=100)) == 1


def test_ivfpq_config_errors(xb_xq):
    xb, _ = xb_xq
    with pytest.raises(LlmkdError, match="pq_m: 5 does not divide"):
        build_index(xb, IndexConfig(type="ivfpq", pq_m=5))
    with pytest.raises(LlmkdError, match="cannot train 256 codes"):
        build_index(xb[:100], IndexConfig(type="ivfpq", pq_m=8))
    with pytest.raises(LlmkdError, match="index.pq_nbits"):
        IndexConfig(type="ivfpq", pq_nbits=17)


def row(index, recall, qps, **config):
    return {"index": index, "params": {}, "config": config, "recall@10": recall, "qps": qps}


def test_pick_fastest_reaching_target():
    table = [row("Flat", 1.0, 100), row("IVF,a", 0.97, 900), row("IVF,b", 0.94, 5000),
             row("HNSW,a", 0.951, 1200), row("HNSW,b", 0.999, 1200), row("PQ", 0.95, 1100)]
    assert pick(table, 0.95)["index"] == "HNSW,b"  # fastest over the bar; a tie in speed goes to recall
    assert pick(table, 0.9)["index"] == "IVF,b"
    assert pick(table, 0.9991)["index"] == "Flat"
    assert pick(table[1:], 0.9991) is None
    assert pick(table, 0.95)["qps"] == max(r["qps"] for r in table if r["recall@10"] >= 0.95)


def test_sweep_rows_and_choice_rebuilds_through_recipe(xb_xq, tmp_path):
    """Flat is exact in the table; the chosen setting, as a --recipe fragment, builds an index with the
    recall the sweep measured."""
    xb, xq = xb_xq
    grid = default_grid(NB, D, hnsw_m=8, pq_ms=(8,), nprobes=(1, 4, 100), ef_searches=(8, 64))
    result = sweep(xb, xq, grid, k=K, repeats=1, build_threads=2, log=lambda *_: None)
    types = [(s["config"]["type"], s["config"]["ip_to_l2"]) for s in result["settings"]]
    approximate = ["ivf", "ivf", "hnsw", "hnsw", "ivfpq", "ivfpq"]  # nprobe 100 > nlist 76 (n // 39) dropped
    assert types == [("flat", False)] + [(t, True) for t in approximate] + [(t, False) for t in approximate]
    assert result["settings"][1]["index"] == "IVF76,Flat (L2 reduction)" and result["settings"][7]["index"] == "IVF76,Flat"
    flat = result["settings"][0]
    assert flat["recall@10"] == 1.0 and result["flat_qps"] == flat["qps"] and result["items"] == NB
    assert result["build_threads"] == 2 and result["threads"] == faiss.omp_get_max_threads()  # restored
    assert result["settings"][1]["params"] == {"nprobe": 1} and result["settings"][1]["config"]["ivf_nlist"] == 76
    choice = pick(result["settings"], 0.9)
    assert choice is not None and choice["recall@10"] >= 0.9
    frag = tmp_path / "index.yaml"
    import yaml

    frag.write_text(yaml.safe_dump(recipe_fragment(choice)))
    cfg = load_config(None, recipe=frag)
    assert dataclasses.asdict(cfg.index) == choice["config"]
    _, I = search(build_index(xb, cfg.index), xq, K)
    assert recall_at_k(I, brute_force(xb, xq, K), K) == pytest.approx(choice["recall@10"])


def test_script_writes_layout(tmp_path):
    out = tmp_path / "ann.json"
    cmd = [sys.executable, str(ROOT / "scripts/ann_sweep.py"), "--synthetic", "2000", "--dim", "16", "--queries", "50",
           "--nprobe", "1", "8", "--ef-search", "16", "--pq-m", "8", "--hnsw-m", "8", "--repeats", "1",
           "--target-recall", "0.9", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}, cwd=ROOT)
    result = json.loads(out.read_text())
    assert result["items"] == 2000 and result["flat_qps"] > 0 and result["target_recall"] == 0.9
    for s in result["settings"]:
        assert {"index", "params", "recall@10", "qps"} <= set(s) and 0 <= s["recall@10"] <= 1
    assert result["choice"] in result["settings"]
    assert (tmp_path / "ann.png").stat().st_size > 0
    assert load_config(None, recipe=tmp_path / "ann_index.yaml").index.type == result["choice"]["config"]["type"]


def test_script_on_a_trained_student(served_run, tmp_path):
    """--config reads the run's student: item vectors as the catalog, valid users' vectors as queries."""
    cfg, out = served_run
    config = tmp_path / "cfg.yaml"
    import yaml

    config.write_text(yaml.safe_dump(cfg.to_dict()))
    result_path = tmp_path / "ann.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/ann_sweep.py"), "--config", str(config), "--student",
                    cfg.distill.name, "--nprobe", "1", "--ef-search", "16", "--pq-m", "4", "--hnsw-m", "8",
                    "--repeats", "1", "--out", str(result_path)],
                          check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_path.read_text())
    from llmkd.data import load_data

    data = load_data(out / "data")
    assert result["items"] == data.num_items and result["dim"] == cfg.student.dim
    assert result["queries"] == len(data.eval_users("valid")) and result["settings"][0]["recall@10"] == 1.0
