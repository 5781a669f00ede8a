"""New items from text in a bundle (`llmkd.commands.add_items`): the cold-start vector, at once in the index,
atomically, and refused where the student has no text path."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO

from llmkd.infra.artifacts import LlmkdError


@pytest.fixture(params=["flat"])
def bundle(served_run, tmp_path, request):
    """A fresh bundle of the text student per test; index.type = the param (indirect parametrisation)."""
    import dataclasses

    from llmkd.infra.config import IndexConfig
    from llmkd.serving.bundle import export_bundle

    cfg = dataclasses.replace(served_run[0], index=IndexConfig(type=request.param))
    return export_bundle(cfg, "student_text", tmp_path / "bundle")


@pytest.fixture(scope="module")
def cold(served_run, synthetic, tmp_path_factory):
    """The run's withheld (cold) items as an items file, their ids and their cold-start student vectors."""
    from llmkd.commands.add_items import student_item_vectors, teacher_item_vectors
    from llmkd.data import load_data
    from llmkd.evaluation.report import load_student
    from llmkd.teacher import TextEncoder

    cfg, out = served_run
    data = load_data(out / "data")
    assert len(data.cold_item_ids) >= 2
    rows = synthetic.items_df[synthetic.items_df["item_id"].astype(str).isin(data.cold_item_ids)]
    path = tmp_path_factory.mktemp("cold") / "new_items.csv"
    rows.iloc[::-1].to_csv(path, index=False)  # another order than the run's: rows must follow the file
    ids = [str(i) for i in rows.iloc[::-1]["item_id"]]
    tc = cfg.teacher
    encoder = TextEncoder(tc.model, tc.pooling, tc.batch_size, device="cpu")
    texts = [data.cold_item_texts[data.cold_item_ids.index(i)] for i in ids]
    with torch.inference_mode():
        vectors = student_item_vectors(load_student(out / "student_text", data), torch.as_tensor(
            teacher_item_vectors(encoder, texts, tc)), out / "student_text").numpy()
    return {"path": path, "ids": ids, "vectors": vectors, "data": data}


def digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bundle", ["flat", "hnsw", "ivf"], indirect=True)
def test_added_items_get_the_cold_start_vector_and_are_recommendable(bundle, cold):
    import faiss

    from llmkd.commands.add_items import add_items
    from llmkd.index import faiss_index, read_index
    from llmkd.serving import Recommender

    before = Recommender.from_pretrained(bundle)
    n, m = before.num_items, len(cold["ids"])
    history = cold["data"].item_ids[:4]
    old_top = before.recommend(history, k=n - 4)
    assert add_items(bundle, cold["path"]) == {"added": m, "num_items": n + m}
    rec = Recommender.from_pretrained(bundle)
    assert rec.item_ids == before.item_ids + cold["ids"] and rec.popularity[n:].tolist() == [0] * m
    np.testing.assert_allclose(rec.table[n : n + m].numpy(), cold["vectors"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rec.table[:n].numpy(), before.table[:n].numpy())  # old items untouched
    index = read_index(bundle / "index/faiss.index")
    assert faiss.vector_to_array(faiss_index(index).id_map).tolist() == list(range(n + m))
    d = cold["vectors"].shape[1]
    D, I = index.search(np.eye(d, dtype=np.float32), n + m)  # query e_i scores item j by its i-th coordinate
    assert all((I == j).any(1).all() for j in range(n, n + m))
    stored = np.stack([D[np.arange(d), (I == j).argmax(1)] for j in range(n, n + m)])
    np.testing.assert_allclose(stored, cold["vectors"], rtol=1e-5, atol=1e-6)
    everything = rec.recommend(history, k=n + m - 4)
    assert set(cold["ids"]) <= set(everything["items"])  # recommendable at once
    old_only = [i for i in everything["items"] if i not in set(cold["ids"])]
    assert old_only == old_top["items"]  # the old items keep their order
    user = rec.user_vectors([np.asarray([rec.row[i] for i in history])])[0]
    for item, score in zip(everything["items"], everything["scores"]):
        if item in cold["ids"]:
            assert score == pytest.approx(float(user @ cold["vectors"][cold["ids"].index(item)]), rel=1e-4, abs=1e-5)
    assert rec.similar_items(cold["ids"][0], k=3)["items"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["num_items"] == n + m and config["added_items"] == [{"source": str(cold["path"]), "count": m}]
    assert f"Added after export: {m} items" in (bundle / "README.md").read_text()


def test_a_crash_while_adding_leaves_the_old_bundle(bundle, cold, monkeypatch):
    from llmkd.commands.add_items import add_items
    from llmkd.serving import Recommender
    from llmkd.serving import bundle as layout

    before = digest(bundle)

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(layout, "write_index", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        add_items(bundle, cold["path"])
    assert digest(bundle) == before
    assert not [p.name for p in bundle.parent.iterdir() if p.name.startswith(".bundle.")
                and not p.name.endswith(".lock")], "a half-written sibling was left"
    assert Recommender.from_pretrained(bundle).num_items == len(cold["data"].item_ids)


def test_ids_already_in_the_bundle_or_repeated_are_refused(bundle, cold, tmp_path):
    from llmkd.commands.add_items import add_items

    known = cold["data"].item_ids[0]
    path = tmp_path / "items.csv"
    path.write_text(f"item_id,title,genre\n{known},alpha,drama\nnew1,bravo,comedy\n")
    with pytest.raises(LlmkdError, match=rf"ids already in the bundle \['{known}'\]"):
        add_items(bundle, path)
    path.write_text("item_id,title\nnew1,alpha\n")
    with pytest.raises(LlmkdError, match="genre"):  # the text template needs it
        add_items(bundle, path)


def test_a_changed_teacher_base_model_is_refused(bundle, cold):
    from llmkd.commands.add_items import add_items
    from llmkd.serving.manifest import write_manifest

    record = json.loads((bundle / "teacher/teacher.json").read_text())
    (bundle / "teacher/teacher.json").write_text(json.dumps({**record, "model_fingerprint": "0" * 16}))
    write_manifest(bundle)  # the bundle vouches for the record: the base model on disk is what differs
    with pytest.raises(LlmkdError, match="teacher base model .* changed since export"):
        add_items(bundle, cold["path"])


def test_a_student_without_text_vectors_refuses_saying_why(served_run, cold, tmp_path):
    """Through the script: one line, exit 2, the reason (no item-text vectors), the bundle unchanged."""
    from llmkd.infra.artifacts import new_meta, write_json
    from llmkd.serving.bundle import export_bundle
    from llmkd.student import TwoTower

    cfg, out = served_run
    data = cold["data"]
    TwoTower(data.num_items, max_len=8, dim=8, num_layers=1, num_heads=1).save_pretrained(out / "student_ids2")
    write_json(out / "student_ids2" / "meta.json", new_meta("student", cfg.to_dict(), data.fingerprint))
    folder = export_bundle(cfg, "student_ids2", tmp_path / "ids")
    before = digest(folder)
    proc = subprocess.run([sys.executable, str(REPO / "scripts/add_items.py"), str(folder), str(cold["path"])],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no item-text vectors (student.content_features: false)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and digest(folder) == before


def test_cold_start_protocol_through_the_bundle_equals_the_cold_start_evaluation(served_run, tmp_path):
    """Items added to a bundle are retrieved exactly as well as `make cold-start` retrieves them (its FAISS
    row, whole catalog): the same vectors, the same rankings, the same Recall / NDCG."""
    from llmkd.experiments.coldstart import cold_start_eval, cold_start_through_bundle

    cfg, _ = served_run
    served = cold_start_through_bundle(cfg, "student_text", tmp_path / "b")
    protocol = cold_start_eval(cfg, ["student_text"])
    assert served["users"] == protocol["users"] and served["cold_items"] == protocol["cold_items"]
    expected = protocol["systems"]["student_text (FAISS flat)"]["whole catalog"]
    assert served["whole catalog"] == pytest.approx(expected, abs=1e-9)
    assert any(v > 0 for v in expected.values())  # something is retrieved: the comparison is not of zeros


def test_the_bundle_carries_the_lora_adapter_add_items_needs(served_run, cold, tmp_path):
    """A teacher cache built with a LoRA adapter: export copies the adapter into the bundle, and add_items
    encodes with it (not the bare base model) even after the run's adapter folder is gone."""
    import dataclasses
    import shutil

    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file

    from llmkd.commands.add_items import add_items, teacher_item_vectors
    from llmkd.serving.bundle import export_bundle
    from llmkd.teacher import TextEncoder, build_teacher_cache

    cfg, run = served_run
    out = tmp_path / "run"
    for name in ("data", "student_text"):
        shutil.copytree(run / name, out / name)
    encoder = TextEncoder(cfg.teacher.model, cfg.teacher.pooling, device="cpu")
    torch.manual_seed(0)  # random, non-zero LoRA weights: an adapter that changes the vectors
    lora = get_peft_model(encoder.model, LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False))
    lora.save_pretrained(out / "lora")
    build_teacher_cache(cold["data"], cfg.teacher, out / "teacher", adapter=out / "lora")
    meta = json.loads((out / "student_text/meta.json").read_text())
    meta.pop("teacher_fingerprint")  # the student was trained on the run's other cache; only the encoding matters here
    meta.pop("inputs", None)
    (out / "student_text/meta.json").write_text(json.dumps(meta))
    bundle = export_bundle(dataclasses.replace(cfg, out_dir=str(out)), "student_text", tmp_path / "bundle")
    assert (bundle / "teacher/adapter/adapter_config.json").is_file()
    texts = [cold["data"].cold_item_texts[cold["data"].cold_item_ids.index(i)] for i in cold["ids"]]
    with_adapter = teacher_item_vectors(TextEncoder(cfg.teacher.model, device="cpu", adapter=out / "lora"), texts,
                                        cfg.teacher)
    bare = teacher_item_vectors(TextEncoder(cfg.teacher.model, device="cpu"), texts, cfg.teacher)
    assert not np.allclose(with_adapter, bare, atol=1e-4)
    shutil.rmtree(out / "lora")
    n = len(cold["data"].item_ids)
    add_items(bundle, cold["path"])
    stored = load_file(str(bundle / "student/model.safetensors"))["item_tower.content"][n : n + len(texts)]
    np.testing.assert_allclose(stored, with_adapter, rtol=1e-5, atol=1e-6)


def test_concurrent_additions_do_not_lose_one_another(bundle, tmp_path, monkeypatch):
    """append_items reads and rewrites the bundle under one lock. While another process adds an item, a
    second addition stops at once naming it, or (asked to wait) waits and then builds on its result; one
    that read the bundle before taking the lock would silently drop the other's item."""
    from llmkd.serving.bundle import append_items

    dim = json.loads((bundle / "teacher/teacher.json").read_text())["dim"]
    signal = tmp_path / "held"
    code = ("import time\nfrom pathlib import Path\nimport numpy as np\nfrom llmkd.infra.locks import artifact_lock\n"
            "from llmkd.serving.bundle import append_items\n"
            f"with artifact_lock({str(bundle)!r}):\n    Path({str(signal)!r}).write_text('1')\n    time.sleep(2)\n"
            f"    append_items({str(bundle)!r}, ['other'], np.zeros((1, {dim}), dtype=np.float32))\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                              env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    try:
        for _ in range(600):
            if signal.exists() or holder.poll() is not None:
                break
            time.sleep(0.05)
        assert signal.exists(), "the other writer did not start"
        before = digest(bundle)
        with pytest.raises(LlmkdError, match=rf"in use by pid {holder.pid}"):
            append_items(bundle, ["mine"], np.zeros((1, dim), dtype=np.float32))
        assert digest(bundle) == before
        monkeypatch.setenv("LLMKD_WAIT_LOCK", "60")
        append_items(bundle, ["mine"], np.ones((1, dim), dtype=np.float32))
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((bundle / "item_ids.json").read_text())[-2:] == ["other", "mine"]


@pytest.mark.parametrize("scale", [0.0, 40.0], ids=["shorter", "longer"])
def test_an_l2_reduction_bundle_takes_new_items_and_rebuilds_for_longer_ones(served_run, tmp_path, scale):
    """A bundle whose index searches through the L2 reduction appends items no longer than its max_norm and
    rebuilds over every item for a longer one; either way it ranks exactly (IVF visiting every list)."""
    import dataclasses

    import faiss

    from llmkd.index import MipsIndex, faiss_index, read_index
    from llmkd.infra.config import IndexConfig
    from llmkd.serving import Recommender
    from llmkd.serving.bundle import INDEX, append_items, export_bundle
    from llmkd.student import TwoTower

    cfg = dataclasses.replace(served_run[0], index=IndexConfig(type="ivf", ivf_nlist=4, ivf_nprobe=4, ip_to_l2=True))
    bundle = export_bundle(cfg, "student_text", tmp_path / "bundle")
    before = read_index(bundle / INDEX)
    assert isinstance(before, MipsIndex)
    model = TwoTower.from_pretrained(bundle / "student")
    n, dim = model.num_items, model.item_tower.content.shape[1]
    text = scale * np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32)
    append_items(bundle, ["new0", "new1", "new2"], text)
    after = read_index(bundle / INDEX)
    rec = Recommender.from_pretrained(bundle)
    norms = np.linalg.norm(rec.table[:-1].numpy(), axis=1)
    longer = norms[n:].max() > before.max_norm
    assert longer == (scale > 0)  # the premise: large text vectors project to longer item vectors
    assert after.max_norm == pytest.approx(norms.max() if longer else before.max_norm, rel=1e-5)
    assert faiss.vector_to_array(faiss_index(after).id_map).tolist() == list(range(n + 3))
    history = rec.item_ids[:4]
    got = rec.recommend(history, k=20)
    user = rec.user_vectors([np.asarray([rec.row[i] for i in history])])[0]
    scores = rec.table[:-1].numpy() @ user
    scores[[rec.row[i] for i in history]] = -np.inf
    top = np.sort(scores)[::-1][:20]
    np.testing.assert_allclose(got["scores"], top, rtol=1e-4, atol=1e-4 * after.max_norm ** 2)
    assert [scores[rec.row[i]] for i in got["items"]] == pytest.approx(list(top), rel=1e-4, abs=1e-4 * after.max_norm ** 2)
