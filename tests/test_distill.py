"""Distillation pieces in-process: training windows, KD targets, hard losses (the loop runs in test_end_to_end)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmkd.distill import hard_loss
from llmkd.distill.kd_targets import KDTargets
from llmkd.distill.windows import WindowDataset
from llmkd.infra.artifacts import LlmkdError
from llmkd.teacher import kd_cuts


def test_windows_cover_every_next_item_once():
    train = [np.arange(100, 113), np.array([5]), np.array([7, 8]), np.arange(20, 25)]
    ds = WindowDataset(train, num_items=200, max_len=5)
    labels: dict[int, list[int]] = {}
    for i in range(len(ds)):
        row = ds[i]
        x, y, u = row["input_ids"], row["labels"], int(row["user"])
        assert x.shape == y.shape == row["teacher_rows"].shape == (5,)
        real = x != 200
        assert torch.equal(real, y != -100)  # a label exactly where there is an input
        assert not real[: int((~real).sum())].any()  # left padded
        assert (row["teacher_rows"] == -1).all()  # no teacher: no KD position
        labels.setdefault(u, []).extend(y[y != -100].tolist())
    for u, seq in enumerate(train):
        assert sorted(labels.get(u, [])) == sorted(seq[1:].tolist()), u


def make_cache(train, n_items=9, d=6, stride=0, seed=0):
    """A teacher cache with a random user vector at each (user, cut) of `kd_cuts`."""
    g = torch.Generator().manual_seed(seed)
    data = SimpleNamespace(train=train)
    pos_user, pos_cut = kd_cuts(data, stride)
    items = torch.nn.functional.normalize(torch.randn(n_items, d, generator=g), dim=1)
    user = torch.nn.functional.normalize(torch.randn(len(pos_user), d, generator=g), dim=1)
    arrays = {"item_emb": items, "user_pos": user.half(), "pos_user": torch.as_tensor(pos_user),
              "pos_cut": torch.as_tensor(pos_cut)}
    return SimpleNamespace(arrays=arrays, item_emb=items, folder="teacher")


@pytest.mark.parametrize("stride", [0, 1, 3])
def test_teacher_rows_point_at_the_history_each_position_has_seen(stride):
    train = [np.arange(10, 23), np.array([5]), np.array([7, 8]), np.arange(20, 25)]
    cache = make_cache(train, n_items=30, stride=stride)
    kd = KDTargets(cache, train, k=3, scale=20.0, device=torch.device("cpu"))
    ds = WindowDataset(train, num_items=30, max_len=5, teacher_rows=kd.rows_by_user(train))
    seen_cuts: dict[int, list[int]] = {}
    for i in range(len(ds)):
        row = ds[i]
        u, x, y, r = int(row["user"]), row["input_ids"], row["labels"], row["teacher_rows"]
        for j in torch.nonzero(r >= 0).flatten().tolist():
            cut = int(cache.arrays["pos_cut"][r[j]])
            assert int(cache.arrays["pos_user"][r[j]]) == u
            assert x[j].item() == train[u][cut - 1] and y[j].item() == train[u][cut]  # history train[:cut] -> train[cut]
            seen_cuts.setdefault(u, []).append(cut)
    for u, seq in enumerate(train):
        expected = [] if len(seq) < 2 else sorted(range(len(seq) - 1, 0, -stride)) if stride else [len(seq) - 1]
        assert sorted(seen_cuts.get(u, [])) == expected, u


def test_kd_targets_exclude_seen_items_and_add_the_positive_once():
    """Each row's candidates are the teacher's top-K items among those its history has not consumed,
    with exact teacher scores, and the positive once; ranked once at the start (not per step)."""
    train = [np.arange(0, 6), np.arange(3, 9), np.arange(0, 9)]  # user 2 at cut 8 leaves one item unseen
    cache = make_cache(train, n_items=9, stride=1)
    kd = KDTargets(cache, train, k=2, scale=20.0, device=torch.device("cpu"))
    rows = torch.arange(len(cache.arrays["pos_user"]))
    full = cache.arrays["user_pos"][rows].float() @ cache.item_emb.T * 20.0
    seen = kd.seen(rows)
    last = int(torch.nonzero((cache.arrays["pos_user"] == 2) & (cache.arrays["pos_cut"] == 8))[0])
    positives = torch.as_tensor([train[u][c] for u, c in zip(cache.arrays["pos_user"], cache.arrays["pos_cut"])])
    positives[0] = int(full[0].masked_fill(seen[0], float("-inf")).argmax())  # a positive among the top-K
    cand, scores, mask = kd(rows, positives)
    assert cand.shape == scores.shape == mask.shape == (len(rows), 3)
    for r in rows.tolist():
        top = torch.topk(full[r].masked_fill(seen[r], float("-inf")), 2)
        real = torch.isfinite(top.values)
        assert cand[r, :2][real].tolist() == top.indices[real].tolist(), r
        assert not seen[r, cand[r, :2][mask[r, :2]]].any(), r
    torch.testing.assert_close(scores[mask], full.gather(1, cand)[mask])  # exact teacher scores
    assert cand[:, -1].tolist() == positives.tolist()
    assert mask[0, -1].item() is False  # the positive is already a top-K candidate: not counted twice
    assert mask[last].tolist() == [True, False, False]  # one unseen item (8), and it is the positive


def test_seen_is_the_whole_history_of_each_teacher_row():
    """Row r masks exactly train[u][:cut]: everything before the position, nothing from the position on."""
    train = [np.array([4, 0, 2, 1]), np.array([3]), np.array([1, 3, 0])]  # 5 items
    cache = make_cache(train, n_items=5, stride=1)
    kd = KDTargets(cache, train, k=2, scale=1.0, device=torch.device("cpu"))
    rows = torch.tensor([4, 0, 2, 3, 1])  # any order, as `rows[at]` gives them
    seen = kd.seen(rows)
    assert seen.shape == (5, 5) and seen.dtype == torch.bool
    for row, r in enumerate(rows.tolist()):
        u, cut = int(cache.arrays["pos_user"][r]), int(cache.arrays["pos_cut"][r])
        assert seen[row].nonzero().flatten().tolist() == sorted(train[u][:cut].tolist()), (r, u, cut)
    assert kd.seen(torch.zeros(0, dtype=torch.long)).shape == (0, 5)


def full_catalog_candidates(cache, kd, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The former path: every row scored against the whole catalog, its history masked, torch.topk."""
    rows = torch.arange(len(cache.arrays["pos_user"]))
    full = cache.arrays["user_pos"].float() @ cache.item_emb.T * scale  # (M, N)
    top = torch.topk(full.masked_fill(kd.seen(rows), float("-inf")), k, dim=1)
    return top.indices, top.values


@pytest.mark.parametrize("chunk, budget", [(4096, 1 << 22), (3, 40)])
def test_flat_faiss_candidates_equal_full_catalog_scoring(chunk, budget):
    """The FAISS flat search finds exactly the rows' top-K unseen items of the full-catalog path, in the
    same order with the same scores, also in small chunks (rows go in order of history length and come
    back in place) and for rows with fewer than K unseen items (-inf there)."""
    rng = np.random.default_rng(1)
    n_items, k = 40, 6
    train = [rng.choice(n_items, size=int(s), replace=False) for s in rng.integers(1, n_items, 25)]
    train.append(np.arange(n_items))  # its late cuts leave fewer than k items unseen
    cache = make_cache(train, n_items=n_items, d=8, stride=1, seed=3)
    kd = KDTargets(cache, train, k=k, scale=20.0, device=torch.device("cpu"))
    ids, scores = kd.rank_candidates(chunk=chunk, budget=budget)
    ref_ids, ref_scores = full_catalog_candidates(cache, kd, k, 20.0)
    assert ids.shape == scores.shape == (len(cache.arrays["pos_user"]), k) and ids.dtype == torch.int32
    real = torch.isfinite(ref_scores)
    assert (~real).any() and real.any(1).all()  # both kinds of row are exercised
    assert torch.equal(torch.isfinite(scores), real)
    assert torch.equal(ids.long()[real], ref_ids[real])
    torch.testing.assert_close(scores[real], ref_scores[real])


def test_ivf_candidates_reach_exact_recall_and_never_offer_a_seen_item():
    """The approximate KD search (inverted lists) against the exact one on clustered teacher vectors:
    recall@K of the candidate sets >= 0.9, and a seen item is never a candidate."""
    from llmkd.evaluation.ann import clustered_vectors

    rng = np.random.default_rng(0)
    n_items, k, d = 3000, 20, 16
    train = [rng.choice(n_items, size=int(s), replace=False) for s in rng.integers(2, 60, 150)]
    cache = make_cache(train, n_items=n_items, d=d, stride=0)
    vectors = torch.nn.functional.normalize(torch.as_tensor(clustered_vectors(n_items + 150, d, 30, seed=0)), dim=1)
    cache.item_emb, cache.arrays["item_emb"] = vectors[:n_items], vectors[:n_items]
    cache.arrays["user_pos"] = vectors[n_items:].half()
    exact = KDTargets(cache, train, k=k, scale=1.0, device=torch.device("cpu"))
    recall = {}
    for nprobe in (1, 4):
        approx = KDTargets(cache, train, k=k, scale=1.0, device=torch.device("cpu"), search="ivf", nprobe=nprobe)
        found = [len(set(a) & set(e)) for a, e in zip(approx.top_ids.tolist(), exact.top_ids.tolist())]
        recall[nprobe] = sum(found) / (k * len(train))
    assert recall[4] >= 0.9 and recall[1] < recall[4], recall  # approximate indeed, and close with 4 lists visited
    rows = torch.arange(len(train))
    seen = exact.seen(rows)
    real = torch.isfinite(approx.top_scores)
    assert not seen.gather(1, approx.top_ids.long())[real].any()
    torch.testing.assert_close(approx.top_scores[real],
                               (cache.arrays["user_pos"].float()[:, None] * vectors[approx.top_ids.long()]).sum(-1)[real])


def test_kd_targets_refuse_a_cache_of_other_sequences():
    train = [np.arange(0, 6), np.arange(3, 9)]
    cache = make_cache(train, n_items=9, stride=1)
    with pytest.raises(LlmkdError, match="teacher.*do not fit"):
        KDTargets(cache, [t[:3] for t in train], k=2, scale=1.0, device=torch.device("cpu"))


@pytest.mark.parametrize("loss", ["full_softmax", "sampled_softmax"])
def test_hard_loss(loss):
    torch.manual_seed(0)
    n_items = 30
    states = torch.randn(4, 5, 8, requires_grad=True)
    items = torch.randn(n_items, 8, requires_grad=True)
    labels = torch.randint(0, n_items, (4, 5))
    labels[:, :2] = -100
    counts = torch.arange(1, n_items + 1, dtype=torch.float32)
    log_q = (counts / counts.sum()).log()
    cfg = SimpleNamespace(loss=loss, num_negatives=64)
    value = hard_loss(states, items, labels, cfg, log_q, generator=torch.Generator().manual_seed(0))
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert states.grad[:, :2].abs().sum() == 0  # unlabelled positions get no gradient
    if loss == "full_softmax":
        keep = labels != -100
        ref = torch.nn.functional.cross_entropy(states[keep] @ items.T, labels[keep])
        torch.testing.assert_close(value, ref)


# ---------------------------------------------------------------- diverged epochs

METRIC_KEYS = {"ndcg@10", "ndcg@50", "recall@10", "recall@50"}


def nan_weights(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model


def test_a_diverged_epoch_is_never_chosen_as_best(synthetic_data):
    """A student whose valid scores are NaN would rank every target first (NDCG 1.0) if ranked by
    comparison; validation must report the epoch as diverged (-inf) and model selection skip it."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from llmkd.distill import end_epoch, validate
    from llmkd.infra.config import StudentConfig
    from llmkd.student import TwoTower

    data = synthetic_data
    torch.manual_seed(0)
    model = TwoTower.from_config(StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0), data.num_items, 8,
                                 data.num_users)
    accelerator = Accelerator(cpu=True)
    eval_dl = DataLoader(torch.as_tensor(data.eval_users("valid")), batch_size=7)
    state = {"epoch": 0, "step": 1, "loss_sum": 1.0, "best_ndcg": -1.0, "best_epoch": -1, "bad_epochs": 0,
             "history": []}
    first = validate(model, eval_dl, data, accelerator)
    assert set(first) == METRIC_KEYS and all(0.0 <= v <= 1.0 for v in first.values()) and first["ndcg@10"] < 1.0
    end_epoch(state, first, 0, 0.0)
    assert state["best_epoch"] == 1
    diverged = validate(nan_weights(model), eval_dl, data, accelerator)
    assert set(diverged) == METRIC_KEYS and all(v == float("-inf") for v in diverged.values()), diverged
    end_epoch(state, diverged, 1, 0.0)
    assert (state["best_epoch"], state["best_ndcg"], state["bad_epochs"]) == (1, first["ndcg@10"], 1)
    assert state["history"][-1]["ndcg@10"] == float("-inf")


def test_training_that_diverges_at_every_epoch_exports_nothing(tmp_path, synthetic, monkeypatch, capsys):
    """NaN weights from the start: each epoch is reported as diverged, none becomes the best, and the
    run ends with a one-line error instead of exporting a NaN student."""
    from llmkd import distill
    from llmkd.data import build_data, save_data
    from llmkd.infra.config import Config, DistillConfig, StudentConfig
    from llmkd.student import TwoTower

    cfg = Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                 student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0),
                 distill=DistillConfig(name="s_nan", alpha=0.0, epochs=2, patience=5, batch_size=16))
    save_data(build_data(cfg.data), tmp_path / "data", cfg.data)
    made = TwoTower.from_config
    monkeypatch.setattr(distill.TwoTower, "from_config", lambda *a, **k: nan_weights(made(*a, **k)))
    with pytest.raises(LlmkdError, match="s_nan.*every epoch diverged"):
        distill.train(cfg)
    assert capsys.readouterr().out.count("diverged") >= 2  # said at each epoch
    assert not (tmp_path / "s_nan").exists()


def test_patience_stops_training_and_the_best_epoch_not_the_last_is_exported(tmp_path, synthetic, monkeypatch):
    """Valid NDCG@10 scripted as 0.1, 0.3, 0.2, 0.25, (0.9 never reached): with patience 2 the run stops after
    epoch 4 of 6, and the exported weights are epoch 2's, not epoch 4's (they differ: training went on)."""
    from llmkd import distill
    from llmkd.data import build_data, save_data
    from llmkd.infra.config import Config, DistillConfig, StudentConfig
    from llmkd.student import TwoTower

    cfg = Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                 student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0),
                 distill=DistillConfig(name="s_patience", alpha=0.0, epochs=6, patience=2, batch_size=16, lr=0.01))
    save_data(build_data(cfg.data), tmp_path / "data", cfg.data)
    script, states = [0.1, 0.3, 0.2, 0.25, 0.9, 0.9], []

    def scripted(model, eval_dl, data, accelerator, split="valid", item_block=65536):
        net = accelerator.unwrap_model(model)
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return {k: script[len(states) - 1] for k in METRIC_KEYS}

    monkeypatch.setattr(distill, "validate", scripted)
    result = distill.train(cfg)
    assert len(states) == 4 and result["epochs_run"] == 4 and result["best_epoch"] == 2
    assert [row["ndcg@10"] for row in result["history"]] == [0.1, 0.3, 0.2, 0.25]
    exported = TwoTower.from_pretrained(tmp_path / "s_patience").state_dict()
    assert all(torch.equal(exported[k], states[1][k]) for k in exported)
    assert any(not torch.equal(exported[k], states[3][k]) for k in exported)


# ---------------------------------------------------------------- KD candidates beyond the window


class SpyKD(KDTargets):
    """KDTargets that records every call's teacher rows and real candidates."""

    calls: list

    def __call__(self, rows, positives):
        cand, scores, mask = super().__call__(rows, positives)
        self.calls.append((rows.clone(), cand.clone(), mask.clone()))
        return cand, scores, mask


def test_kd_candidates_exclude_items_seen_before_the_window():
    """User 0 has 12 train items, more than max_history (4): a window late in the sequence does not hold
    the first items, yet they were consumed before every position in it, so they can never be KD
    candidates. The teacher here prefers lower item ids, so its top-K unseen items at cut c of user 0
    (history 0..c-1) are exactly c, c+1, c+2; a window-only mask would offer 0, 1, 2 again."""
    from torch.utils.data import DataLoader

    from llmkd.distill import distill_loss

    n_items, k = 16, 3
    train = [np.arange(0, 12), np.array([12, 13, 14])]
    pos_user, pos_cut = kd_cuts(SimpleNamespace(train=train), 1)
    prefs = torch.linspace(1.0, 0.5, n_items)  # the teacher scores item i higher than item i + 1
    cache = SimpleNamespace(folder="teacher", item_emb=torch.eye(n_items),
                            arrays={"item_emb": torch.eye(n_items), "pos_user": torch.as_tensor(pos_user),
                                    "pos_cut": torch.as_tensor(pos_cut),
                                    "user_pos": (prefs / prefs.norm()).expand(len(pos_user), -1).half()})
    kd = SpyKD(cache, train, k=k, scale=20.0, device=torch.device("cpu"))
    kd.calls = []
    ds = WindowDataset(train, n_items, max_len=4, teacher_rows=kd.rows_by_user(train))
    assert any(start > 0 for u, start, _ in ds.rows if u == 0)  # windows that miss the start of the sequence
    dc = SimpleNamespace(alpha=1.0, loss="full_softmax", user_align=0.0, item_align=0.0)
    accelerator = SimpleNamespace(num_processes=1, reduce=lambda t, op: t)
    g = torch.Generator().manual_seed(0)
    for batch in DataLoader(ds, batch_size=3):
        states, items = torch.randn(len(batch["user"]), 4, 8, generator=g), torch.randn(n_items, 8, generator=g)
        distill_loss(states, items, batch, dc, None, kd, lambda s, t, m: (s * m).sum() * 0.0, None, accelerator)
    checked = 0
    for rows, cand, mask in kd.calls:
        for r, c, m in zip(rows.tolist(), cand.tolist(), mask.tolist()):
            u, cut = int(pos_user[r]), int(pos_cut[r])
            real = [i for i, keep in zip(c[:k], m[:k]) if keep]
            assert not set(real) & set(train[u][:cut].tolist()), (u, cut, real)
            unseen = [i for i in range(n_items) if i not in set(train[u][:cut].tolist())]
            assert real == unseen[:k], (u, cut, real)
            checked += 1
    assert checked == len(pos_user)  # every teacher position was distilled once


def test_length_buckets_cover_every_window_once_with_similar_lengths():
    from llmkd.distill.windows import LengthBucketSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 51, size=1000)
    sampler = LengthBucketSampler(lengths, batch_size=10, seed=3, bucket_batches=20)
    sampler.set_epoch(0)
    first = list(sampler)
    assert sorted(first) == list(range(1000))  # a permutation: every window once per epoch
    spread = [np.ptp(lengths[first[i : i + 10]]) for i in range(0, 1000, 10)]
    random_spread = [np.ptp(lengths[rng.permutation(1000)[:10]]) for _ in range(100)]
    assert np.mean(spread) < np.mean(random_spread) / 4  # batches of similar lengths
    assert list(sampler) == first  # same seed and epoch, same order (resume replays it)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_trim_padding_keeps_every_real_state():
    from llmkd.distill.windows import trim_padding
    from llmkd.student import TwoTower

    torch.manual_seed(0)
    model = TwoTower(num_items=30, max_len=8, dim=16, num_heads=2, dropout=0.0).eval()
    x = torch.full((3, 8), 30)
    x[0, -3:] = torch.tensor([1, 2, 3])
    x[1, -5:] = torch.tensor([4, 5, 6, 7, 8])
    x[2, -1:] = torch.tensor([9])
    batch = {"input_ids": x, "labels": torch.where(x == 30, -100, x), "user": torch.arange(3)}
    trimmed = trim_padding(batch, 30)
    assert trimmed["input_ids"].shape == (3, 5) and torch.equal(trimmed["user"], batch["user"])
    with torch.no_grad():
        full, _ = model(x)
        cut, _ = model(trimmed["input_ids"])
    real = x != 30
    torch.testing.assert_close(cut[real[:, 3:]], full[real])


def test_the_trainer_initialises_ids_from_the_teacher_item_vectors(tmp_path, synthetic, monkeypatch, teacher_items):
    """student.content_init > 0: the trainer loads the teacher cache and starts the id embeddings from
    its item vectors (`init_from_content`, tested in test_student); 0 leaves the random init alone."""
    from llmkd import distill, student
    from llmkd.infra.config import Config, DistillConfig, StudentConfig

    data, item_emb = teacher_items
    calls = []
    monkeypatch.setattr(student, "init_from_content", lambda emb, vectors, std, whiten: calls.append((emb.weight.shape, vectors, std, whiten)))
    for init, source, whiten in ((0.0, "teacher", False), (0.1, "teacher", False), (0.1, "shuffled", True),
                                 (0.1, "random", False)):
        cfg = Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                     student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0, content_init=init,
                                           content_init_source=source, content_init_whiten=whiten),
                     distill=DistillConfig(name=f"s_init{init}_{source}", alpha=0.0, epochs=1, batch_size=64))
        assert cfg.uses_teacher == (init > 0)
        distill.train(cfg)
    assert [c[2:] for c in calls] == [(0.1, False), (0.1, True), (0.1, False)] and all(c[0] == (data.num_items + 1, 8) for c in calls)
    teacher, shuffled, random = (c[1] for c in calls)
    assert teacher is item_emb  # the teacher's vectors as they are
    assert not np.allclose(shuffled, item_emb) and np.allclose(np.sort(shuffled, 0), np.sort(item_emb, 0))
    assert random.shape == item_emb.shape and not np.isin(random, item_emb).any()


# ---------------------------------------------------------------- hard loss chosen by catalog size


def test_auto_loss_is_full_softmax_up_to_the_threshold_and_named_losses_stay():
    from conftest import REPO

    from llmkd.infra.config import DistillConfig, load_config

    dc = DistillConfig()
    assert dc.loss == "auto" and dc.hard_loss_for(1682) == "full_softmax"  # ml-100k keeps the full softmax
    assert dc.hard_loss_for(dc.sampled_above) == "full_softmax"
    assert dc.hard_loss_for(dc.sampled_above + 1) == "sampled_softmax"
    assert DistillConfig(loss="full_softmax").hard_loss_for(10 ** 7) == "full_softmax"
    assert DistillConfig(loss="sampled_softmax").hard_loss_for(10) == "sampled_softmax"
    assert load_config(REPO / "configs/amazon_beauty.yaml").distill.hard_loss_for(12_101) == "full_softmax"
    assert load_config(REPO / "configs/ml100k.yaml").distill.hard_loss_for(1682) == "full_softmax"
    assert DistillConfig(kd_index="auto").kd_index_for(dc.kd_exact_max_items + 1) == "ivf"
    assert DistillConfig(kd_index="auto").kd_index_for(dc.kd_exact_max_items) == "flat"
    with pytest.raises(LlmkdError, match="distill.loss: expected 'auto'"):
        DistillConfig(loss="softmax")
    with pytest.raises(LlmkdError, match="distill.kd_index: expected"):
        DistillConfig(kd_index="hnsw32")


def test_hard_loss_refuses_an_unresolved_auto():
    cfg = SimpleNamespace(loss="auto", num_negatives=4)
    with pytest.raises(LlmkdError, match="hard_loss_for"):
        hard_loss(torch.zeros(1, 2, 3), torch.zeros(5, 3), torch.zeros(1, 2, dtype=torch.long), cfg, torch.zeros(5))


@pytest.mark.parametrize("sampled_above, expected", [(10 ** 6, "full_softmax"), (5, "sampled_softmax")])
def test_the_trainer_resolves_auto_by_the_catalog_size(tmp_path, synthetic, monkeypatch, sampled_above, expected):
    """The loss the trainer really computes (spied on `hard_loss`) and records in the student's meta."""
    import json

    from llmkd import distill
    from llmkd.data import build_data, save_data
    from llmkd.infra.config import Config, DistillConfig, StudentConfig

    cfg = Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                 student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0),
                 distill=DistillConfig(name="s", alpha=0.0, epochs=1, batch_size=64, sampled_above=sampled_above,
                                       num_negatives=8))
    save_data(build_data(cfg.data), tmp_path / "data", cfg.data)
    seen, real = [], distill.hard_loss
    monkeypatch.setattr(distill, "hard_loss", lambda s, i, y, dc, *a, **k: (seen.append(dc.loss), real(s, i, y, dc, *a, **k))[1])
    distill.train(cfg)
    assert seen and set(seen) == {expected}
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["hard_loss"] == expected


def test_training_reads_only_the_teacher_arrays_it_needs(tmp_path):
    """The per-split user vectors (n_users x d each) stay on disk in every training process; the arrays
    read are bit-identical to a full load; a truncated file is still a one-line error."""
    import json

    from safetensors.numpy import save_file

    from llmkd.distill import TEACHER_KEYS
    from llmkd.teacher import TeacherCache

    rng = np.random.default_rng(0)
    arrays = {"item_emb": rng.random((7, 4), dtype=np.float32), "user_pos": rng.random((3, 4)).astype(np.float16),
              "pos_user": np.arange(3), "pos_cut": np.ones(3, dtype=np.int64),
              "user_valid": rng.random((5, 4), dtype=np.float32), "user_test": rng.random((5, 4), dtype=np.float32)}
    (tmp_path / "meta.json").write_text(json.dumps({"stage": "teacher"}))
    save_file(arrays, str(tmp_path / "embeddings.safetensors"))
    some, every = TeacherCache(tmp_path, keys=TEACHER_KEYS), TeacherCache(tmp_path)
    assert set(some.arrays) == set(TEACHER_KEYS) and set(every.arrays) == set(arrays)
    for key in TEACHER_KEYS:
        assert torch.equal(some.arrays[key], every.arrays[key])
    path = tmp_path / "embeddings.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LlmkdError, match="unreadable teacher cache"):
        TeacherCache(tmp_path, keys=TEACHER_KEYS)


# ---------------------------------------------------------------- sparse item updates


@pytest.mark.parametrize("content", [False, True])
def test_item_rows_are_the_rows_of_the_whole_table(content):
    from llmkd.student import TwoTower

    torch.manual_seed(0)
    model = TwoTower(num_items=30, max_len=6, dim=8, pooling="mean", content_dim=5 if content else 0, dropout=0.0)
    if content:
        model.item_tower.content[:30] = torch.randn(30, 5)
    ids = torch.tensor([[0, 29, 30], [7, 7, 30]])  # 30 = padding: a zero vector either way
    table = model.item_tower()
    rows = model.item_tower.rows(ids)
    assert torch.allclose(rows, table[ids], atol=1e-6) and not rows[:, -1].any()
    history = torch.tensor([[30, 30, 3, 4, 5, 6], [1, 2, 3, 4, 5, 29]])
    (s_table, items), (s_rows, lookup) = model(history), model(history, rows=True)
    assert torch.allclose(s_table, s_rows, atol=1e-6) and torch.allclose(lookup[ids[0, :2]], items[ids[0, :2]], atol=1e-6)


def sparse_step_models():
    from llmkd.student import TwoTower

    torch.manual_seed(0)
    base = TwoTower(num_items=200, max_len=5, dim=8, pooling="mean", dropout=0.0)
    dense, sparse = TwoTower(**base.config), TwoTower(**base.config)
    dense.load_state_dict(base.state_dict())
    sparse.load_state_dict(base.state_dict())
    return dense, sparse


def one_step(model, sparse: bool, history, labels, log_q, dc):
    from llmkd.distill import make_optimizers

    optimizers = make_optimizers(model, torch.nn.Module(), dc, sparse)
    states, items = model(history, rows=sparse)
    torch.manual_seed(1)  # the same negatives in both runs
    loss = hard_loss(states, items, labels, dc, log_q)
    loss.backward()
    grad = model.item_tower.embedding.weight.grad
    for opt in optimizers:
        opt.step()
        opt.zero_grad()
    return grad


def test_a_sparse_step_updates_only_the_rows_it_read_and_equals_the_dense_step():
    """Adam's first step is ~lr * sign(g) wherever g != 0 and exactly 0 where g == 0, so one sparse step
    (SparseAdam on the rows read) must equal one dense AdamW step; and rows never read stay untouched."""
    dc = SimpleNamespace(loss="sampled_softmax", num_negatives=16, lr=0.01, weight_decay=0.0)
    dense, sparse = sparse_step_models()
    before = sparse.item_tower.embedding.weight.detach().clone()
    history = torch.tensor([[200, 3, 4, 5, 6], [10, 11, 12, 13, 14]])
    labels = torch.tensor([[-100, 4, 5, 6, 7], [11, 12, 13, 14, 15]])
    log_q = torch.full((200,), -math.log(200))
    g_dense = one_step(dense, False, history, labels, log_q, dc)
    g_sparse = one_step(sparse, True, history, labels, log_q, dc)
    assert g_sparse.is_sparse and not g_dense.is_sparse
    assert torch.allclose(g_sparse.to_dense(), g_dense, atol=1e-7)
    after = sparse.item_tower.embedding.weight.detach()
    touched = (after != before).any(1)
    read = torch.zeros(201, dtype=torch.bool)
    read[g_dense.abs().sum(1) > 0] = True
    assert touched.any() and torch.equal(touched, read)  # exactly the rows with a gradient moved
    # equal up to where eps sits: SparseAdam adds it to sqrt(v) before bias correction, AdamW after,
    # so a tiny gradient's first step is slightly shorter (here at most 1 % of lr)
    assert torch.allclose(after - before, dense.item_tower.embedding.weight.detach() - before, rtol=0.01, atol=1e-7)
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):  # the rest: AdamW in both
        assert name == "item_tower.embedding.weight" or torch.allclose(p, q, atol=1e-6), name


def test_item_updates_resolve_by_catalog_and_name_what_blocks_sparse():
    from llmkd.infra.config import Config, DistillConfig, StudentConfig

    def cfg(**kw):
        student = StudentConfig(**kw.pop("student", {}))
        return Config(student=student, distill=DistillConfig(**kw))

    auto = cfg()
    assert auto.item_updates_for(auto.distill.sampled_above) == "dense"  # full softmax up to the threshold
    assert auto.item_updates_for(auto.distill.sampled_above + 1) == "sparse"
    assert auto.item_updates_for(10 ** 6, num_processes=2) == "dense"
    assert cfg(loss="sampled_softmax").item_updates_for(12_101) == "dense"  # Beauty's runs stay as they were
    assert cfg(loss="sampled_softmax", item_updates="sparse").item_updates_for(12_101) == "sparse"
    assert cfg(item_updates="dense").item_updates_for(10 ** 6) == "dense"
    for kw, reason in [({"loss": "full_softmax"}, "full softmax"), ({"item_align": 1.0}, "item_align"),
                       ({"weight_decay": 0.01}, "weight decay"),
                       ({"student": {"content_features": True, "id_dropout": 0.1}}, "id_dropout")]:
        c = cfg(item_updates="sparse", **kw)
        assert c.item_updates_for(10 ** 6, strict=False) == "sparse"
        with pytest.raises(LlmkdError, match=reason):
            c.item_updates_for(10 ** 6)
        assert cfg(**kw).item_updates_for(10 ** 6) == "dense"
    with pytest.raises(LlmkdError, match="NCCL"):
        cfg(item_updates="sparse").item_updates_for(10 ** 6, num_processes=2)
    with pytest.raises(LlmkdError, match="distill.item_updates: expected"):
        DistillConfig(item_updates="lazy")


def test_training_key_counts_item_updates_as_resolved():
    """A run recorded before the setting existed (it reads back as 'auto') is the same run as 'dense'
    where auto means dense, and a different run from 'sparse'."""
    from llmkd.infra.config import Config, DistillConfig
    from llmkd.infra.reuse import training_key

    auto, dense, sparse = (Config(distill=DistillConfig(loss="sampled_softmax", item_updates=m))
                           for m in ("auto", "dense", "sparse"))
    assert training_key(auto, 12_101) == training_key(dense, 12_101) != training_key(sparse, 12_101)
    assert training_key(auto, 10 ** 6) == training_key(sparse, 10 ** 6) != training_key(dense, 10 ** 6)


def test_training_key_ignores_the_negatives_count_only_where_the_full_softmax_runs():
    from llmkd.infra.config import Config, DistillConfig
    from llmkd.infra.reuse import training_key

    a, b = (Config(distill=DistillConfig(loss="auto", num_negatives=n)) for n in (256, 1024))
    assert training_key(a, 12_101) == training_key(b, 12_101)  # full softmax: the count is never read
    assert training_key(a, 10 ** 6) != training_key(b, 10 ** 6)  # sampled: it is the run's setting

def test_content_init_anchor_holds_the_id_rows_near_their_start(tmp_path, synthetic, monkeypatch, teacher_items):
    """student.content_init_anchor: the trained id rows end far closer to their content start under a strong
    pull than with none (same seed, same data); it needs content_init and keeps the item table dense."""
    from llmkd import distill
    from llmkd.infra.config import Config, DistillConfig, StudentConfig
    from llmkd.student import TwoTower, init_item_embedding

    data, item_emb = teacher_items
    drift = {}
    for pull in (0.0, 100.0):
        cfg = Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                     student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0, content_init=0.1,
                                           content_init_anchor=pull),
                     distill=DistillConfig(name=f"pull{pull}", alpha=0.0, epochs=2, batch_size=32, lr=0.01))
        distill.train(cfg)
        start = TwoTower.from_config(cfg.student, data.num_items, 8, data.num_users).item_tower.embedding
        init_item_embedding(start, cfg.student, item_emb, seed=0)
        trained = TwoTower.from_pretrained(tmp_path / f"pull{pull}").item_tower.embedding.weight
        drift[pull] = float((trained - start.weight).detach().norm() / start.weight.detach().norm())
    assert drift[0.0] > 0.1 and drift[100.0] < drift[0.0] / 2, drift  # (Adam: a strong pull, not a clamp)
    with pytest.raises(LlmkdError, match="content_init_anchor"):
        StudentConfig(content_init_anchor=1.0)
    assert "content_init_anchor" in Config(student=StudentConfig(content_init=0.1, content_init_anchor=1.0),
                                           distill=DistillConfig(loss="sampled_softmax")).sparse_items_blocker(10 ** 6)


def test_the_trainer_runs_the_user_tower_in_length_groups_and_reuse_ignores_the_count(tmp_path, synthetic,
                                                                                        monkeypatch):
    """distill.length_groups reaches the model's forward (a speed setting: the reuse key leaves it out, so a
    run trained with another count stands for this one; a different learning rate does not)."""
    from llmkd import distill
    from llmkd.data import build_data, save_data
    from llmkd.infra.config import Config, DistillConfig, StudentConfig
    from llmkd.infra.reuse import training_key
    from llmkd.student import TwoTower

    data = build_data(synthetic.data_config())
    save_data(data, tmp_path / "data", synthetic.data_config())
    seen, grouped = [], TwoTower.grouped_states
    monkeypatch.setattr(TwoTower, "grouped_states",
                        lambda self, v, r, u, groups: seen.append(groups) or grouped(self, v, r, u, groups))
    cfgs = {g: Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                      student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0),
                      distill=DistillConfig(name=f"g{g}", alpha=0.0, epochs=1, batch_size=64, length_groups=g))
            for g in (1, 3)}
    for cfg in cfgs.values():
        distill.train(cfg)
    assert seen and set(seen) == {3}  # every step of the 3-group run, none of the 1-group run
    assert training_key(cfgs[1], data.num_items) == training_key(cfgs[3], data.num_items)
    other = Config(**{**cfgs[3].__dict__, "distill": DistillConfig(name="g3", alpha=0.0, epochs=1, batch_size=64,
                                                                  length_groups=3, lr=0.01)})
    assert training_key(other, data.num_items) != training_key(cfgs[3], data.num_items)


def test_the_trainer_learns_sparsely_and_resumes(tmp_path, synthetic, capsys, monkeypatch):
    """item_updates 'sparse' end to end: trains and records it; a rerun with resume=True really resumes
    (says so, trains only the epoch left, keeps the first epoch's record from the checkpoint), restores
    both optimizers' states exactly as the checkpoint saved them (AdamW's and SparseAdam's moments and
    steps, both non-trivial), and ends with exactly the weights of an uninterrupted run of the same seed
    (which a run retrained from scratch would match too: hence the other checks)."""
    import copy
    import json

    from safetensors.torch import load_file

    from llmkd import distill
    from llmkd.data import build_data, save_data
    from llmkd.infra.config import Config, DistillConfig, StudentConfig

    def cfg(name, epochs):
        return Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                      student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0),
                      distill=DistillConfig(name=name, alpha=0.0, epochs=epochs, patience=10, batch_size=64,
                                            loss="sampled_softmax", num_negatives=8, item_updates="sparse"))

    save_data(build_data(cfg("x", 1).data), tmp_path / "data", cfg("x", 1).data)
    distill.train(cfg("whole", 2))
    first = distill.train(cfg("halves", 1))
    last = tmp_path / "checkpoints" / "halves" / "last"
    assert json.loads((last / "train_state.json").read_text())["epoch"] == 1
    saved = [torch.load(last / f, weights_only=True) for f in ("optimizer.bin", "optimizer_1.bin")]
    restored = []
    real_load = distill.load_checkpoint

    def spy(accelerator, *args, **kwargs):  # what the optimizers hold right after the checkpoint is loaded
        state = real_load(accelerator, *args, **kwargs)
        restored.append([(type(o.optimizer).__name__, copy.deepcopy(o.state_dict())) for o in accelerator._optimizers])
        return state

    monkeypatch.setattr(distill, "load_checkpoint", spy)
    capsys.readouterr()
    resumed = distill.train(cfg("halves", 2), resume=True)
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "epoch 2, 0 batches done" in printed, printed
    assert "halves epoch 2:" in printed and "halves epoch 1:" not in printed, printed  # epoch 1 not trained again
    assert resumed["history"][0] == first["history"][0] and resumed["epochs_run"] == 2  # seconds included
    assert len(restored) == 1 and [name for name, _ in restored[0]] == ["AdamW", "SparseAdam"]
    for (name, got), want in zip(restored[0], saved, strict=True):
        assert want["state"] and got["state"].keys() == want["state"].keys(), name  # moments exist, every param
        for p, moments in want["state"].items():
            assert moments.keys() == got["state"][p].keys(), (name, p)
            assert float(moments["step"]) > 0, (name, p)
            for k, v in moments.items():
                assert torch.equal(torch.as_tensor(got["state"][p][k]), torch.as_tensor(v)), (name, p, k)
    meta = json.loads((tmp_path / "whole" / "meta.json").read_text())
    assert meta["item_updates"] == "sparse" and meta["epochs_run"] == 2
    halves = json.loads((tmp_path / "halves" / "meta.json").read_text())
    assert [r["ndcg@10"] for r in halves["history"]] == [r["ndcg@10"] for r in meta["history"]]
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("whole", "halves"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_valid_users_samples_the_same_users_for_every_run(synthetic_data):
    from llmkd.distill.windows import get_dataloaders
    from llmkd.infra.config import Config, DistillConfig

    def users(**kw):
        _, eval_dl = get_dataloaders(synthetic_data, Config(distill=DistillConfig(**kw)))
        return sorted(int(u) for batch in eval_dl for u in batch)

    every = users()
    assert every == sorted(synthetic_data.eval_users("valid").tolist())
    some = users(valid_users=5)
    assert len(some) == 5 and set(some) < set(every)
    assert users(valid_users=5, seed=1) == some  # not drawn from the training seed
    assert users(valid_users=10 ** 6) == every
