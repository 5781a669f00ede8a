"""The serving bundle and the Python API (`llmkd.serving`): export, load, recommend, refuse.

Built on `served_run` (conftest.py): a tiny text student trained in-process on the synthetic data.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from llmkd.infra.artifacts import LlmkdError


@pytest.fixture(scope="module")
def bundle(served_run, tmp_path_factory):
    from llmkd.serving.bundle import export_bundle

    return export_bundle(served_run[0], "student_text", tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(scope="module")
def rec(bundle):
    from llmkd.serving import Recommender

    return Recommender.from_pretrained(bundle)


@pytest.fixture(scope="module")
def run_data(served_run):
    from llmkd.data import load_data

    return load_data(served_run[1] / "data")


def offline_top(served_run, data, split: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The offline evaluation's ranking: (users, top-k rows, their scores), student scores over all items
    (`llmkd.evaluation.report.student_scorer`), seen items masked (`llmkd.evaluation.metrics.mask_seen`), ties to
    the lower row."""
    from llmkd.evaluation.metrics import mask_seen
    from llmkd.evaluation.report import load_student, student_scorer

    model = load_student(served_run[1] / "student_text", data)
    users = data.eval_users(split)
    with torch.no_grad():
        scores = mask_seen(student_scorer(model, data)(users, split).clone(), [data.history(u, split) for u in users])
    order = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :k]
    return users, order, np.take_along_axis(scores.numpy(), order, 1)


def test_bundle_holds_what_serving_needs(bundle, run_data):
    import faiss

    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert {"config.json", "meta.json", "README.md", "student/config.json", "student/model.safetensors",
            "item_ids.json", "popularity.json", "index/faiss.index", "teacher/teacher.json"} <= files
    assert json.loads((bundle / "item_ids.json").read_text()) == run_data.item_ids
    assert json.loads((bundle / "popularity.json").read_text()) == run_data.item_counts().tolist()
    index = faiss.read_index(str(bundle / "index/faiss.index"))
    assert isinstance(index, faiss.IndexIDMap) and index.ntotal == run_data.num_items
    assert faiss.vector_to_array(index.id_map).tolist() == list(range(run_data.num_items))
    card = (bundle / "README.md").read_text()
    for words in ("## Data", "## Teacher and recipe", "## Metrics", "## Library versions", "torch", "faiss"):
        assert words in card
    assert not list(bundle.parent.glob(".b.*")), "atomic write left a sibling"


def test_stored_text_vectors_are_the_teacher_cache(bundle, served_run):
    from safetensors.numpy import load_file

    content = load_file(str(bundle / "student/model.safetensors"))["item_tower.content"]
    teacher = load_file(str(served_run[1] / "teacher/embeddings.safetensors"))["item_emb"]
    np.testing.assert_array_equal(content[:-1], teacher)  # the last row is the padding item


def test_card_reports_eval_metrics_when_recorded(served_run, tmp_path):
    from llmkd.serving.bundle import export_bundle

    cfg, out = served_run
    metrics = {"student_text": {"valid": {"ndcg@10": 0.1234, "users": 5}, "test": {"ndcg@10": 0.0567, "users": 5}}}
    (out / "eval").mkdir(exist_ok=True)
    (out / "eval/metrics.json").write_text(json.dumps(metrics))
    try:
        card = (export_bundle(cfg, "student_text", tmp_path / "b") / "README.md").read_text()
    finally:
        (out / "eval/metrics.json").unlink()
    assert "| valid | 0.1234 | 5 |" in card and "| test | 0.0567 | 5 |" in card


@pytest.mark.parametrize("split", ["valid", "test"])
def test_recommend_equals_offline_ranking(rec, served_run, run_data, split):
    k = 10
    users, top, scores = offline_top(served_run, run_data, split, k)
    histories = [[run_data.item_ids[i] for i in run_data.history(u, split)] for u in users]
    got = rec.recommend_batch(histories, k)
    for row, res in enumerate(got):
        assert res["items"] == [run_data.item_ids[i] for i in top[row]], f"user {users[row]}"
        np.testing.assert_allclose(res["scores"], scores[row], rtol=1e-5, atol=1e-5)
    one = rec.recommend(histories[-1], k)  # alone: other padding, the same ranking
    assert one["items"] == got[-1]["items"]
    np.testing.assert_allclose(one["scores"], got[-1]["scores"], rtol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_bundles(served_run, rec, run_data, tmp_path, kind):
    """index.type from the config reaches the bundle (inside the id map); on 36 items HNSW (efSearch 128) and
    IVF (one list) are exhaustive, so they rank as the flat bundle does."""
    import dataclasses

    import faiss

    from llmkd.infra.config import IndexConfig
    from llmkd.serving import Recommender
    from llmkd.serving.bundle import export_bundle

    cfg = dataclasses.replace(served_run[0], index=IndexConfig(type=kind))
    approx = Recommender.from_pretrained(export_bundle(cfg, "student_text", tmp_path / "b"))
    inner = faiss.downcast_index(approx.index.index)
    assert isinstance(inner, {"hnsw": faiss.IndexHNSWFlat, "ivf": faiss.IndexIVFFlat}[kind])
    assert approx.config["index"]["type"] == kind
    histories = [[run_data.item_ids[i] for i in run_data.history(u, "test")] for u in run_data.eval_users("test")]
    assert [r["items"] for r in approx.recommend_batch(histories, 10)] == \
           [r["items"] for r in rec.recommend_batch(histories, 10)]


def test_seen_and_excluded_items_are_not_recommended(rec, run_data):
    history = run_data.item_ids[:5]
    first = rec.recommend(history, k=rec.num_items - 5)["items"]
    assert len(first) == rec.num_items - 5 and not set(first) & set(history)
    top3 = first[:3]
    res = rec.recommend(history, k=10, exclude=top3)["items"]
    assert not set(res) & set(top3) and res == first[3:13]
    kept = rec.recommend(history, k=rec.num_items, exclude_seen=False)["items"]
    assert set(history) <= set(kept)


def test_empty_history_gets_popular_items(rec, run_data):
    counts = run_data.item_counts()
    expected = [run_data.item_ids[i] for i in np.argsort(-counts, kind="stable")[:5]]
    res = rec.recommend([], k=5)
    assert res["items"] == expected and res["scores"] == [float(counts[run_data.item_ids.index(i)]) for i in expected]
    assert rec.recommend([], k=5, exclude=expected[:2])["items"] == [run_data.item_ids[i] for i in
                                                                     np.argsort(-counts, kind="stable")[2:7]]


def test_unknown_ids_are_named_and_dropped_only_when_asked(rec, run_data):
    from llmkd.serving import UnknownItems

    known = run_data.item_ids[:3]
    with pytest.raises(UnknownItems, match=r"history: unknown item ids 'nope', 'gone'") as e:
        rec.recommend([known[0], "nope", known[1], "gone", "nope"], k=5)
    assert e.value.ids == ["nope", "gone"] and isinstance(e.value, LlmkdError)
    assert rec.recommend([known[0], "nope", known[1]], k=5, unknown="drop") == rec.recommend(known[:2], k=5)
    with pytest.raises(UnknownItems, match="exclude: unknown item id 'x'"):
        rec.recommend(known, k=5, exclude=["x"])
    with pytest.raises(UnknownItems, match="histories\\[1\\]: unknown item id 'zz'"):
        rec.recommend_batch([known, ["zz"]], k=5)
    with pytest.raises(UnknownItems, match="item_id: unknown item id 'q'"):
        rec.similar_items("q")


@pytest.mark.parametrize("k", [0, -1, 10_000, 2.0, "3", True, None])
def test_bad_k_is_refused_naming_k(rec, k):
    from llmkd.serving import BadRequest

    with pytest.raises(BadRequest, match=r"^k: expected") as e:
        rec.recommend(["x"], k=k)
    assert e.value.field == "k"


def test_non_string_ids_are_refused_naming_the_position(rec, run_data):
    from llmkd.serving import BadRequest

    with pytest.raises(BadRequest, match=r"history\[1\]: expected a string item id, got int 5"):
        rec.recommend([run_data.item_ids[0], 5], k=3)
    with pytest.raises(BadRequest, match="history: expected a list of item ids, got str"):
        rec.recommend("101", k=3)


def test_similar_items_rank_by_the_item_vectors(rec):
    vectors = rec.table[: rec.num_items].numpy()
    item = rec.item_ids[7]
    scores = vectors @ vectors[7]
    scores[7] = -np.inf
    expected = [rec.item_ids[i] for i in np.argsort(-scores, kind="stable")[:5]]
    res = rec.similar_items(item, k=5)
    assert res["items"] == expected
    np.testing.assert_allclose(res["scores"], np.sort(scores)[::-1][:5], rtol=1e-5)


def test_loading_and_recommending_import_no_teacher_code(bundle, run_data):
    """In a fresh interpreter: `import llmkd` imports no torch; loading and recommending import neither
    transformers nor peft nor the teacher / training modules."""
    code = (
        "import sys, llmkd\n"
        "assert 'torch' not in sys.modules, 'import llmkd imported torch'\n"
        "from llmkd import Recommender\n"
        f"r = Recommender.from_pretrained({str(bundle)!r})\n"
        f"print(r.recommend({run_data.item_ids[:2]!r}, k=3)['items'], r.recommend([], k=2)['items'],\n"
        f"      r.similar_items({run_data.item_ids[0]!r}, k=2)['items'])\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'accelerate', 'datasets')\n"
        "       or m in ('llmkd.teacher', 'llmkd.distill', 'llmkd.teacher.finetune', 'llmkd.losses', 'llmkd.data')]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("'") >= 14  # three lists of ids were printed


def test_id_student_and_user_id_student(served_run, tmp_path, run_data):
    """An id-only student exports (no teacher/ folder); a student with user-id embeddings is refused."""
    from llmkd.infra.artifacts import new_meta, write_json
    from llmkd.serving import Recommender
    from llmkd.serving.bundle import export_bundle
    from llmkd.student import TwoTower

    cfg, out = served_run
    for name, users in (("student_ids", 0), ("student_users", run_data.num_users)):
        model = TwoTower(run_data.num_items, max_len=8, dim=8, num_layers=1, num_heads=1, num_users=users)
        model.save_pretrained(out / name)
        write_json(out / name / "meta.json", new_meta("student", cfg.to_dict(), run_data.fingerprint))
    folder = export_bundle(cfg, "student_ids", tmp_path / "ids")
    assert not (folder / "teacher").exists()
    assert json.loads((folder / "config.json").read_text())["item_text"] is None
    ids = Recommender.from_pretrained(folder)  # its item table is the embedding parameter itself
    assert len(ids.recommend(run_data.item_ids[:2], k=4)["items"]) == 4
    assert len(ids.similar_items(run_data.item_ids[0], k=3)["items"]) == 3
    with pytest.raises(LlmkdError, match="student_users: the student uses per-user id embeddings"):
        export_bundle(cfg, "student_users", tmp_path / "users")
    assert not (tmp_path / "users").exists()


def test_a_bundle_with_sizes_that_disagree_is_refused(bundle, tmp_path):
    import shutil

    from llmkd.serving import Recommender
    from llmkd.serving.manifest import write_manifest

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    ids = json.loads((copy / "item_ids.json").read_text())
    (copy / "item_ids.json").write_text(json.dumps(ids[:-1]))
    with pytest.raises(LlmkdError, match="item_ids.json: size differs from manifest.json"):
        Recommender.from_pretrained(copy)
    write_manifest(copy)  # a manifest that vouches for the bad file: the loader's own checks still refuse it
    with pytest.raises(LlmkdError, match="sizes disagree"):
        Recommender.from_pretrained(copy)
    (copy / "meta.json").unlink()
    write_manifest(copy)
    with pytest.raises(LlmkdError, match="not a bundle artifact"):
        Recommender.from_pretrained(copy)


def test_batch_masking_equals_a_per_query_isin():
    """`masked` (one sorted search for the batch) against the plain per-query `np.isin`, with missing (-1)
    results, repeated and empty masks."""
    from llmkd.serving.recommender import masked

    rng = np.random.default_rng(0)
    for _ in range(20):
        n, B = int(rng.integers(1, 50)), int(rng.integers(1, 8))
        I = rng.integers(-1, n, size=(B, int(rng.integers(1, 12))))
        masks = [rng.integers(0, n, size=int(rng.integers(0, 2 * n))) for _ in range(B)]
        want = np.stack([(i < 0) | np.isin(i, m) for i, m in zip(I, masks)])
        np.testing.assert_array_equal(masked(I, masks, n), want)


def test_served_user_vectors_equal_the_training_forwards_last_state(rec, run_data):
    """The Recommender's user vectors (`serve_user_vectors`: last layer for the newest query only) equal the
    training forward's last state for the same histories, batched (padded) and one at a time."""
    users = run_data.eval_users("test")
    rows = [np.asarray(run_data.history(u, "test")) for u in users]
    with torch.no_grad():
        full = rec.model(rec.model.pad_histories(rows))[0][:, -1].numpy()
    np.testing.assert_allclose(rec.user_vectors(rows), full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([rec.user_vectors([r]) for r in rows[:5]]), full[:5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [40, 200], ids=["one-pass", "by-length"])
def test_histories_grouped_by_length_give_the_same_vectors(batch):
    """`Recommender.user_vectors` serves a small batch in one padded pass and a large one by length group
    (`LENGTH_BUCKETS`, above `BUCKETS_ABOVE`); a random 2-layer student with histories of 1 to over max_len
    items gets the training forward's last states either way."""
    import faiss

    from llmkd.serving.recommender import BUCKETS_ABOVE

    from llmkd.serving import Recommender
    from llmkd.student import TwoTower

    torch.manual_seed(0)
    n = 60
    model = TwoTower(n, max_len=40, dim=16, num_layers=2, num_heads=2, dropout=0.2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.item_tower.embedding.weight[n].zero_()
        index = faiss.IndexIDMap(faiss.IndexFlatIP(16))
        index.add_with_ids(model.item_vectors().numpy(), np.arange(n))
    rec = Recommender(model, [str(i) for i in range(n)], np.ones(n, dtype=np.float32), index, {})
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, n, size=int(rng.integers(1, 50))) for _ in range(batch)]
    assert (batch > BUCKETS_ABOVE) == (batch == 200)
    with torch.no_grad():
        full = model(model.pad_histories(rows))[0][:, -1].numpy()
    np.testing.assert_allclose(rec.user_vectors(rows), full, rtol=1e-5, atol=1e-5)


def test_exact_path_in_chunks_and_with_fewer_items_left_than_k(rec, run_data, monkeypatch):
    """The flat bundle's exact path: a mask that leaves 3 items returns those 3 (no -inf padding), and
    batches scored in chunks of a few queries rank as one matrix does."""
    import llmkd.serving.recommender as recommender

    assert rec.exact is not None  # the fixture's bundle is flat: this is the path under test
    history = run_data.item_ids[3:]
    left = rec.recommend(history, k=10)
    assert sorted(left["items"]) == sorted(run_data.item_ids[:3]) and np.isfinite(left["scores"]).all()
    histories = [[run_data.item_ids[i] for i in run_data.history(u, "test")] for u in run_data.eval_users("test")]
    whole = rec.recommend_batch(histories, 10)
    monkeypatch.setattr(recommender, "EXACT_BLOCK", 3 * rec.num_items)  # 3 queries a chunk
    chunked = rec.recommend_batch(histories, 10)
    assert [r["items"] for r in chunked] == [r["items"] for r in whole]


def test_batch_rows_in_one_pass_equal_history_by_history(rec, run_data):
    """`recommend_batch` maps all ids of a batch in one pass; it must give each history's rows as `rows` does,
    and step aside (None) for anything `rows` refuses or drops, so the error still names its history."""
    from llmkd.serving import BadRequest

    ids = run_data.item_ids
    batch = [ids[:3], [], (ids[5], ids[1]), ids[7:8]]
    fast = rec._batch_rows(batch)
    assert [r.tolist() for r in fast] == [rec.rows(h, "h").tolist() for h in batch]
    assert rec._batch_rows([ids[:2], [ids[0], "no-such-item"]]) is None
    assert rec._batch_rows([ids[:2], ids[0]]) is None  # a string, not a list of ids
    assert rec._batch_rows([]) == []
    with pytest.raises(BadRequest, match=r"histories\[1\]"):
        rec.recommend_batch([ids[:2], [ids[0], "no-such-item"]], 5)
    dropped = rec.recommend_batch([ids[:2], [ids[0], "no-such-item"]], 5, unknown="drop")
    alone = rec.recommend([ids[0]], 5)
    assert dropped[1]["items"] == alone["items"]  # scores: float rounding of another padding
    np.testing.assert_allclose(dropped[1]["scores"], alone["scores"], rtol=1e-5)


def test_user_tower_runs_without_onednn_and_restores_the_flag(rec, run_data, monkeypatch):
    """oneDNN compiles and caches a GELU kernel per input shape, so a server seeing many (batch, length)
    shapes grew its memory for minutes (results/serving_memory_cpu.json). The Recommender's user-tower calls
    run with it off; the process-wide flag is back as it was afterwards, also when calls from several
    threads overlap (a naive save-and-restore would leave it off for good)."""
    import threading

    seen, tower = [], rec.model.serve_user_vectors

    def spy(*args, **kwargs):
        seen.append(torch.backends.mkldnn.enabled)
        return tower(*args, **kwargs)

    monkeypatch.setattr(rec.model, "serve_user_vectors", spy)
    rows = [np.asarray(run_data.history(u, "test")) for u in run_data.eval_users("test")][:8]
    assert torch.backends.mkldnn.enabled
    try:
        rec.user_vectors(rows)
        assert seen and not any(seen)
        assert torch.backends.mkldnn.enabled
        barrier, errors = threading.Barrier(4), []

        def work() -> None:
            try:
                barrier.wait()
                for _ in range(20):
                    rec.user_vectors(rows)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and not any(seen)
        assert torch.backends.mkldnn.enabled
    finally:
        torch.backends.mkldnn.enabled = True
