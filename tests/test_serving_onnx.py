"""The bundle's user tower as an ONNX graph (`llmkd export-onnx`, `Recommender(backend="onnx")`)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from llmkd.infra.artifacts import LlmkdError


@pytest.fixture(scope="module")
def onnx_bundle(served_run, tmp_path_factory):
    from llmkd.serving.bundle import export_bundle
    from llmkd.serving.onnx import export_onnx

    folder = export_bundle(served_run[0], "student_text", tmp_path_factory.mktemp("onnx") / "b")
    export_onnx(folder)
    return folder


@pytest.mark.parametrize("pooling", ["transformer", "sasrec", "sasrec_attend_padding", "mean"])
def test_the_graph_reproduces_torch_for_every_history_length(tmp_path, pooling):
    """Every length 1..max_len, padded by random amounts (the graph has no padding trim and no no-padding
    shortcut, torch's serving path has both), batches of 1 and 5; a graph of another model fails it."""
    from llmkd.serving.onnx import UserTowerGraph, export_onnx, parity, probe_histories, session
    from llmkd.student import TwoTower

    torch.manual_seed(0)
    pooling, _, extra = pooling.partition("_")
    kw = {"attend_padding": True} if extra else {}
    model = TwoTower(num_items=40, max_len=7, dim=8, pooling=pooling, num_layers=2, num_heads=2, recency_decay=0.2,
                     **kw)
    model.eval().save_pretrained(tmp_path / "student")
    path = export_onnx(tmp_path)
    graph, rng = UserTowerGraph(model), np.random.default_rng(1)
    assert parity(graph, session(path), probe_histories(model, rng) + probe_histories(model, rng, batch=1)) < 1e-5
    other = TwoTower(num_items=40, max_len=7, dim=8, pooling=pooling, num_layers=2, num_heads=2, recency_decay=0.2,
                     **kw)
    assert parity(UserTowerGraph(other.eval()), session(path), probe_histories(model, rng)) > 1e-3


def test_onnx_backend_recommends_what_torch_recommends(onnx_bundle, served_run):
    from llmkd.data import load_data
    from llmkd.serving import Recommender

    data = load_data(served_run[1] / "data")
    torch_rec, onnx_rec = Recommender.from_pretrained(onnx_bundle), Recommender.from_pretrained(onnx_bundle, "onnx")
    histories = [[data.item_ids[i] for i in data.history(u, "test")] for u in data.eval_users("test")[:40]]
    histories += [[], [data.item_ids[3]]]  # popularity fallback; one item
    a, b = torch_rec.recommend_batch(histories, k=10), onnx_rec.recommend_batch(histories, k=10)
    assert [r["items"] for r in a] == [r["items"] for r in b]
    assert np.allclose([s for r in a for s in r["scores"]], [s for r in b for s in r["scores"]], atol=1e-4)
    assert onnx_rec.user_tower is not None and torch_rec.user_tower is None


def test_the_graph_joins_the_bundles_manifest(onnx_bundle):
    """`export-onnx` records the graph in manifest.json (so the bundle gets a new version id)."""
    import hashlib
    import json

    from llmkd.serving.manifest import check_files

    files = json.loads((onnx_bundle / "manifest.json").read_text())["files"]
    graph = (onnx_bundle / "user_tower.onnx").read_bytes()
    assert files["user_tower.onnx"] == {"size": len(graph), "sha256": hashlib.sha256(graph).hexdigest()}
    assert check_files(onnx_bundle, full=True)


def test_adding_items_drops_the_stale_graph(onnx_bundle, tmp_path):
    """The graph holds the old item table (and padding row): the grown bundle must not serve it."""
    import json

    from llmkd.serving import Recommender
    from llmkd.serving.bundle import append_items
    from llmkd.serving.manifest import check_files

    copy = tmp_path / "b"
    shutil.copytree(onnx_bundle, copy)
    dim = json.loads((copy / "teacher/teacher.json").read_text())["dim"]
    append_items(copy, ["new-1"], np.zeros((1, dim), dtype=np.float32))
    assert not (copy / "user_tower.onnx").exists() and check_files(copy, full=True)
    with pytest.raises(LlmkdError, match="llmkd export-onnx"):
        Recommender.from_pretrained(copy, "onnx")


def test_a_graph_that_disagrees_with_torch_is_not_written(served_run, tmp_path, monkeypatch):
    from llmkd.serving import onnx
    from llmkd.serving.bundle import export_bundle

    folder = export_bundle(served_run[0], "student_text", tmp_path / "b")
    monkeypatch.setattr(onnx, "parity", lambda *a: 0.5)
    with pytest.raises(LlmkdError, match="differ from torch's by 5.00e-01"):
        onnx.export_onnx(folder)
    assert not (folder / onnx.ONNX_FILE).exists() and not list(folder.glob(".*tmp"))


def test_onnx_backend_without_the_graph_says_how_to_make_it(onnx_bundle, tmp_path):
    from llmkd.serving import Recommender

    copy = tmp_path / "b"
    shutil.copytree(onnx_bundle, copy)
    (copy / "user_tower.onnx").unlink()
    with pytest.raises(LlmkdError, match="llmkd export-onnx"):
        Recommender.from_pretrained(copy, "onnx")
    with pytest.raises(LlmkdError, match="expected 'torch' or 'onnx'"):
        Recommender.from_pretrained(copy, "tensorrt")
