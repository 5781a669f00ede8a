"""The peer run (llmkd.experiments.peers, peer_training): llmkd's split -> the peer library's table, a fitted peer's scores
-> llmkd's item order, the incremental JSON. Everything but the last tests runs without RecTools (CI installs
only `.[dev]`); those fit one epoch on the synthetic data when RecTools is installed (`make peer-beauty`)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmkd.data import RecData, save_data
from llmkd.evaluation.metrics import evaluate_scores, summarize
from llmkd.experiments.peer_training import checkpoint_path, per_user_path, run_peers
from llmkd.experiments.peers import (
    DATETIME,
    FLOOR,
    ITEM,
    PAD_ROW,
    USER,
    PeerScorer,
    PeerSettings,
    interactions_table,
    item_rows,
    left_pad,
)
from llmkd.infra.artifacts import LlmkdError

TINY = PeerSettings(dim=8, heads=1, batch_size=16, max_len=5, epochs=1, eval_every=1, patience=1, eval_batch_size=8)


def sequences(table, users: int) -> list[np.ndarray]:
    """The table's items per user in its time order (a stable sort on datetime, as the peer reads it)."""
    t = table.sample(frac=1.0, random_state=0).sort_values(DATETIME, kind="stable")
    return [t.loc[t[USER] == u, ITEM].to_numpy() for u in range(users)]


def test_valid_table_is_the_train_sequences_in_order(synthetic_data):
    data = synthetic_data
    table = interactions_table(data, "valid")
    assert len(table) == len(data.train.values)
    for u, seq in enumerate(sequences(table, data.num_users)):
        np.testing.assert_array_equal(seq, data.train[u])
    for split in ("valid", "test"):  # synthetic users never repeat an item: no held-out item is in the table
        users = data.eval_users(split)
        held = set(zip(users.tolist(), data.targets(split)[users].tolist()))
        assert not held & set(zip(table[USER].tolist(), table[ITEM].tolist()))


def test_test_table_is_the_test_history(synthetic_data):
    data = synthetic_data
    table = interactions_table(data, "test")
    assert len(table) == len(data.train.values) + len(data.eval_users("valid"))
    for u, seq in enumerate(sequences(table, data.num_users)):
        np.testing.assert_array_equal(seq, data.history(u, "test"))
    users = data.eval_users("test")
    assert not set(zip(users.tolist(), data.test_item[users].tolist())) & set(zip(table[USER], table[ITEM]))
    with pytest.raises(LlmkdError, match="split"):
        interactions_table(data, "train")


def test_item_rows_map_the_peer_ids_back():
    rows = item_rows(np.array(["PAD", 3, 0, 5], dtype=object), 6)
    np.testing.assert_array_equal(rows, [2, -1, -1, 1, -1, 3])
    with pytest.raises(LlmkdError, match="PAD"):
        item_rows([3, "PAD"], 6)
    with pytest.raises(LlmkdError, match="llmkd item indices"):
        item_rows(["PAD", 3, 6], 6)


def test_left_pad_keeps_the_last_known_items_right_aligned():
    rows = np.array([2, -1, 4, 1, 3])  # item 1 unknown to the peer
    x = left_pad([np.array([0, 1, 2, 3, 4]), np.array([4]), np.array([1])], rows, 3)
    assert x.tolist() == [[4, 1, 3], [PAD_ROW, PAD_ROW, 3], [PAD_ROW] * 3]


class Similarity:
    """RecTools' DistanceSimilarityModule with the dot product: identity towers, logits h @ items.T."""

    session_tower_forward = staticmethod(lambda h: h)
    item_tower_forward = staticmethod(lambda i: i)

    def __call__(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return h @ items.T


class FakeNet(torch.nn.Module):
    """A stand-in for RecTools' TransformerTorchBackbone: every position encodes to (1, 1) and item row r's
    embedding is (values[r] / 2, values[r] / 2), so row r scores values[r]; records the sessions it encodes."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.emb = torch.nn.Parameter(torch.tensor(values)[:, None] * torch.ones(1, 2) / 2)
        self.item_model = SimpleNamespace(get_all_embeddings=lambda: self.emb)
        self.similarity_module = Similarity()
        self.seen: list[torch.Tensor] = []

    def encode_sessions(self, batch: dict, items: torch.Tensor) -> torch.Tensor:
        assert not self.training, "scoring must run in eval mode"
        self.seen.append(batch["x"])
        return torch.ones(len(batch["x"]), batch["x"].shape[1], 2)


def fake_model(data: RecData, known: list[int], max_len: int = 4) -> SimpleNamespace:
    """A fitted-model stand-in whose item map holds `known` (llmkd indices, in a shuffled order): item j scores j + 1."""
    net = FakeNet([0.0] + [j + 1.0 for j in known])
    prep = SimpleNamespace(item_id_map=SimpleNamespace(external_ids=np.array(["PAD", *known], dtype=object)),
                           session_max_len=max_len)
    return SimpleNamespace(data_preparator=prep, torch_model=net)


def test_scorer_maps_scores_back_to_llmkd_order(synthetic_data):
    data = synthetic_data
    known = [int(i) for i in np.random.default_rng(0).permutation(data.num_items) if i != 7]  # item 7: no embedding
    model = fake_model(data, known)
    model.torch_model.train()
    users = data.eval_users("test")[:5]
    scores = PeerScorer(model, data)(users, "test")
    assert scores.shape == (5, data.num_items) and scores.dtype == torch.float32
    expected = torch.arange(1, data.num_items + 1, dtype=torch.float32).expand(5, -1).clone()
    expected[:, 7] = FLOOR
    torch.testing.assert_close(scores, expected)
    assert model.torch_model.training, "the model's train/eval mode is restored"
    rows = item_rows(model.data_preparator.item_id_map.external_ids, data.num_items)
    x = model.torch_model.seen[-1]
    for i, u in enumerate(users):  # the last 4 known items of train + valid, as peer rows
        hist = rows[data.history(int(u), "test")]
        want = hist[hist >= 0][-4:]
        assert x[i, 4 - len(want):].tolist() == want.tolist() and (x[i, : 4 - len(want)] == PAD_ROW).all()


def test_scorer_feeds_llmkds_evaluator(synthetic_data):
    """Highest index first: the evaluator's ranks follow (finite metrics, masking applied)."""
    data = synthetic_data
    m = summarize(evaluate_scores(data, "valid", PeerScorer(fake_model(data, list(range(data.num_items))), data)))
    assert all(np.isfinite(v) for v in m.values()) and m["users"] == len(data.eval_users("valid"))


def fake_run(calls: list):
    def run_one(out_dir, settings, seed, data, log):
        calls.append(seed)
        row = {s: {"ndcg@10": 0.1 * (seed + 1), "recall@10": 0.2, "recall@50": 0.3, "users": 5} for s in ("valid", "test")}
        per_user = {s: np.full(len(data.eval_users(s)), seed, dtype=np.float32) for s in ("valid", "test")}
        return row | {"best_epoch": 1, "epochs": 1, "wall_seconds": 0.0, "per_user": per_user}
    return run_one


def test_run_peers_writes_after_each_seed_and_reuses_finished_ones(synthetic, synthetic_data, tmp_path):
    save_data(synthetic_data, tmp_path / "data", synthetic.data_config())
    out, calls = tmp_path / "peers.json", []
    run_peers(tmp_path, [0], out, TINY, run_one=fake_run(calls), log=lambda _: None)
    left = checkpoint_path(tmp_path, 1)  # a training state left by a killed seed 1
    left.parent.mkdir(parents=True)
    left.write_bytes(b"state")
    result = run_peers(tmp_path, [0, 1], out, TINY, run_one=fake_run(calls), log=lambda _: None)
    assert calls == [0, 1], "seed 0 reused on the rerun"
    assert not left.exists(), "seed 1's training state is removed once its row is written"
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert {"system", "library", "version", "settings", "seeds", "rows", "published"} <= set(on_disk)
    assert on_disk["seeds"] == [0, 1] and on_disk["published"]["SASRec-CE (CE-SCE-LLMRec)"] == 0.0597
    assert on_disk["rows"]["mean"]["test"]["ndcg@10"] == pytest.approx(0.15)
    assert on_disk["rows"]["std"]["test"]["ndcg@10"] == pytest.approx(np.std([0.1, 0.2], ddof=1))
    arrays = np.load(per_user_path(out))
    np.testing.assert_array_equal(arrays["users_test"], synthetic_data.eval_users("test"))
    assert (arrays["seed1_test_ndcg@10"] == 1).all() and (arrays["seed0_valid_ndcg@10"] == 0).all()
    with pytest.raises(LlmkdError, match="other settings"):
        run_peers(tmp_path, [2], out, PeerSettings(epochs=2), run_one=fake_run(calls), log=lambda _: None)


# ---------------------------------------------------------------- with RecTools installed


@pytest.fixture(scope="module")
def fitted(synthetic_data):
    pytest.importorskip("rectools")
    from llmkd.experiments.peer_training import fit_peer

    return fit_peer(synthetic_data, TINY, seed=0, log=lambda _: None)


def test_rectools_one_epoch_gives_finite_metrics(synthetic, synthetic_data, tmp_path, fitted):
    from rectools import Columns

    assert (USER, ITEM, DATETIME) == (Columns.User, Columns.Item, Columns.Datetime)
    model, info = fitted
    assert info["epochs"] == 1 and info["best_epoch"] == 1
    for split in ("valid", "test"):
        m = summarize(evaluate_scores(synthetic_data, split, PeerScorer(model, synthetic_data)))
        assert all(np.isfinite(v) for v in m.values())


def test_rectools_scorer_matches_its_own_recommend(synthetic_data, fitted):
    """Our scores equal RecTools' own recommend() on the test history (same users, items and values)."""
    from rectools.dataset import Dataset

    data, (model, _) = synthetic_data, fitted
    users = data.eval_users("test")
    reco = model.recommend(users, Dataset.construct(interactions_table(data, "test")), k=data.num_items,
                           filter_viewed=False)
    scores = PeerScorer(model, data)(users, "test").numpy()
    row = {int(u): i for i, u in enumerate(users)}
    ours = scores[[row[int(u)] for u in reco[USER]], reco[ITEM].to_numpy(dtype=np.int64)]
    np.testing.assert_allclose(ours, reco["score"].to_numpy(), rtol=1e-5, atol=1e-5)
    assert len(reco) == len(users) * int((item_rows(model.data_preparator.item_id_map.external_ids,
                                                    data.num_items) >= 0).sum())


def test_rectools_loss_at_targets_equals_its_own_softmax_loss(fitted):
    """The peer's training loss (logits only where a target is) equals RecTools' own `_calc_softmax_loss` over
    every window position (padding dropped by `ignore_index`) on a left-padded batch, weights included; a mean
    over all positions, or padding rows left in, would differ."""
    model, _ = fitted
    module, net = model.lightning_model, model.lightning_model.torch_model
    net.eval()  # no dropout: both paths see the same session vectors
    gen = torch.Generator().manual_seed(0)
    n_items = net.item_model.get_all_embeddings().shape[0]
    x = torch.randint(1, n_items, (6, TINY.max_len), generator=gen)
    lengths = torch.tensor([1, 2, 3, 5, 4, 1])
    pad = torch.arange(TINY.max_len)[None, :] < (TINY.max_len - lengths)[:, None]  # left padding
    x[pad] = 0
    y = torch.randint(1, n_items, x.shape, generator=gen)
    y[pad] = 0
    w = torch.rand(x.shape, generator=gen) + 0.5
    batch = {"x": x, "y": y, "yw": w}
    with torch.no_grad():
        ours = module.softmax_loss_at_targets(batch)
        theirs = type(module)._calc_softmax_loss(net(batch), y, w)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert pad.any()


def test_rectools_fit_resumes_from_its_checkpoint_as_if_never_stopped(synthetic_data, tmp_path):
    """A fit killed after its second chunk resumes from the checkpoint: the same valid curve and the same
    final weights as an uninterrupted fit (so the weights, Adam's moments and the random draws were restored;
    retraining from scratch, or a fresh optimizer, would give another curve)."""
    pytest.importorskip("rectools")
    from llmkd.experiments.peer_training import fit_peer

    settings = PeerSettings(dim=8, heads=1, batch_size=16, max_len=5, epochs=4, eval_every=1, patience=10,
                            eval_batch_size=8)
    whole, info = fit_peer(synthetic_data, settings, seed=0, log=lambda _: None)

    class Killed(Exception):
        pass

    def kill_after_two(message: str) -> None:
        if "epoch 2:" in message:
            raise Killed

    ckpt = tmp_path / "seed0.pt"
    with pytest.raises(Killed):
        fit_peer(synthetic_data, settings, seed=0, log=kill_after_two, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    resumed, rinfo = fit_peer(synthetic_data, settings, seed=0, log=lambda _: None, checkpoint=ckpt)
    assert rinfo["resumed_at"] == 2 and rinfo["epochs"] == info["epochs"] == 4
    assert [c["valid_ndcg@10"] for c in rinfo["curve"]] == pytest.approx([c["valid_ndcg@10"] for c in info["curve"]])
    for k, v in whole.torch_model.state_dict().items():
        torch.testing.assert_close(resumed.torch_model.state_dict()[k], v)
    other = PeerSettings(**{**settings.as_json(), "adam_betas": (0.9, 0.999), "dropout": 0.1})
    with pytest.raises(LlmkdError, match="other settings"):
        fit_peer(synthetic_data, other, seed=0, log=lambda _: None, checkpoint=ckpt)
