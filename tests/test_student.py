"""The two-tower student: save/load round trip, causality, left padding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import StudentConfig
from llmkd.student import TwoTower

N_ITEMS, MAX_LEN, N_USERS = 25, 8, 6

VARIANTS = {
    "transformer": {"pooling": "transformer", "num_layers": 1},
    "transformer_content_users": {"pooling": "transformer", "num_layers": 2, "content_dim": 12, "num_users": N_USERS},
    "mean": {"pooling": "mean", "recency_decay": 0.3},
    "mean_content_users": {"pooling": "mean", "recency_decay": 0.0, "content_dim": 12, "num_users": N_USERS},
    "transformer_content_mlp": {"pooling": "transformer", "num_layers": 1, "content_dim": 12, "content_hidden": 20,
                                "id_dropout": 0.5},
    "sasrec": {"pooling": "sasrec", "num_layers": 2},
    "sasrec_content_users": {"pooling": "sasrec", "num_layers": 1, "content_dim": 12, "num_users": N_USERS},
    "sasrec_attend_padding": {"pooling": "sasrec", "num_layers": 2, "attend_padding": True},
}


def make(variant: str, seed: int = 0) -> TwoTower:
    torch.manual_seed(seed)
    kw = VARIANTS[variant]
    model = TwoTower(num_items=N_ITEMS, max_len=MAX_LEN, dim=16, num_heads=2, dropout=0.1, **kw)
    if kw.get("content_dim"):
        model.item_tower.content[:N_ITEMS] = torch.randn(N_ITEMS, kw["content_dim"])
    with torch.no_grad():  # move every weight off its init so a missed tensor shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.item_tower.embedding.weight[N_ITEMS].zero_()  # the padding row, as padding_idx keeps it
    return model.eval()


def histories(seed: int = 0, n: int = 5) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    hs = [rng.integers(0, N_ITEMS, size=rng.integers(1, MAX_LEN + 3)) for _ in range(n)]
    return make("mean").pad_histories(hs)


def users(n: int = 5) -> torch.Tensor:
    return torch.arange(n) % N_USERS


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip(variant, tmp_path):
    model = make(variant)
    model.save_pretrained(tmp_path / "s", extra={"note": "extra keys are ignored on load"})
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"config.json", "model.safetensors"}
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["num_items"] == N_ITEMS and config["pooling"] == VARIANTS[variant]["pooling"]
    back = TwoTower.from_pretrained(tmp_path / "s")
    assert not back.training
    h, u = histories(), users()
    with torch.no_grad():
        s1, i1 = model(h, u)
        s2, i2 = back(h, u)
    torch.testing.assert_close(s2, s1)
    torch.testing.assert_close(i2, i1)
    torch.testing.assert_close(back.item_vectors(), model.item_vectors())
    assert back.num_parameters() == model.num_parameters()


def test_from_pretrained_refuses_non_student(tmp_path):
    with pytest.raises(LlmkdError, match="config.json"):
        TwoTower.from_pretrained(tmp_path)
    make("mean").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(LlmkdError, match="model.safetensors"):
        TwoTower.from_pretrained(tmp_path)


def test_shapes_and_padding_item():
    model = make("transformer_content_users")
    h = histories()
    states, items = model(h, users())
    assert states.shape == (len(h), MAX_LEN, 16) and items.shape == (N_ITEMS, 16)
    assert model.user_vectors(h, users()).shape == (len(h), 16)
    table = model.item_tower()
    assert table.shape == (N_ITEMS + 1, 16)
    assert torch.count_nonzero(table[-1]) == 0  # the padding row stays zero, content included


def test_pad_histories_left_pads_and_truncates():
    model = make("mean")
    out = model.pad_histories([np.array([3, 4]), np.arange(MAX_LEN + 2), np.array([], dtype=np.int64)])
    assert out.shape == (3, MAX_LEN) and out.dtype == torch.long
    assert out[0].tolist() == [N_ITEMS] * (MAX_LEN - 2) + [3, 4]
    assert out[1].tolist() == list(range(2, MAX_LEN + 2))  # the most recent max_len items
    assert out[2].tolist() == [N_ITEMS] * MAX_LEN


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    """Changing the item at position j changes no state before j (and does change the state at j)."""
    model = make(variant)
    h = histories(seed=1)
    h[:, :] = torch.randint(0, N_ITEMS, h.shape, generator=torch.Generator().manual_seed(0))  # full rows
    j = 5
    h2 = h.clone()
    h2[:, j] = (h[:, j] + 1) % N_ITEMS
    with torch.no_grad():
        a, _ = model(h, users())
        b, _ = model(h2, users())
    torch.testing.assert_close(b[:, :j], a[:, :j])
    assert not torch.allclose(b[:, j], a[:, j])


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_does_not_change_last_state(variant):
    """Prepending padding (or using a longer window) leaves the last state unchanged (eval mode)."""
    model = make(variant)
    seq = torch.tensor([[4, 17, 2, 9]])
    padded = torch.cat([torch.full((1, MAX_LEN - 4), N_ITEMS), seq], 1)
    u = torch.tensor([2])
    with torch.no_grad():
        short = model.user_vectors(seq, u)
        full = model.user_vectors(padded, u)
        two = model.user_vectors(torch.cat([torch.full((1, 2), N_ITEMS), seq], 1), u)
    torch.testing.assert_close(full, short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two, short, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_rows_are_independent(variant):
    """A row's states do not depend on the other rows of the batch (padding masks per row)."""
    model = make(variant)
    h, u = histories(seed=2), users()
    with torch.no_grad():
        batch, _ = model(h, u)
        single = torch.cat([model(h[i : i + 1], u[i : i + 1])[0] for i in range(len(h))])
    torch.testing.assert_close(batch[:, -1], single[:, -1], atol=1e-5, rtol=1e-5)


def test_from_config_factory():
    cfg = StudentConfig(dim=16, pooling="mean", num_layers=1, num_heads=2, use_user_id=True, content_features=True)
    m = TwoTower.from_config(cfg, num_items=N_ITEMS, max_len=MAX_LEN, num_users=N_USERS, content_dim=12)
    assert m.config["num_users"] == N_USERS and m.config["content_dim"] == 12
    off = TwoTower.from_config(StudentConfig(dim=16), num_items=N_ITEMS, max_len=MAX_LEN, num_users=N_USERS,
                               content_dim=12)
    assert off.config["num_users"] == 0 and off.config["content_dim"] == 0


def test_trains():
    """A few steps of next-item cross-entropy lower the loss (gradients reach every tower)."""
    torch.manual_seed(0)
    model = TwoTower(num_items=N_ITEMS, max_len=MAX_LEN, dim=16, num_layers=1, dropout=0.0).train()
    h = torch.randint(0, N_ITEMS, (16, MAX_LEN))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        states, items = model(h[:, :-1])
        loss = torch.nn.functional.cross_entropy((states @ items.T).reshape(-1, N_ITEMS), h[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_id_dropout_drops_whole_id_rows_in_training_only():
    """DropoutNet-style: in training some items lose their id embedding and are their text path alone;
    in eval every item has both (deterministic)."""
    model = make("transformer_content_mlp")
    tower = model.item_tower
    text_only = tower.content_proj(tower.content)[:N_ITEMS]
    both = text_only + tower.embedding.weight[:N_ITEMS]
    with torch.no_grad():
        torch.testing.assert_close(model.item_vectors(), both)
        model.train()
        torch.manual_seed(0)
        vectors = tower()[:N_ITEMS]
    dropped = torch.isclose(vectors, text_only).all(1)
    kept = torch.isclose(vectors, both).all(1)
    assert (dropped | kept).all() and 0 < int(dropped.sum()) < N_ITEMS
    assert torch.equal(tower()[N_ITEMS], torch.zeros(16))  # the padding row stays zero


@pytest.mark.parametrize("variant", VARIANTS)
def test_user_vectors_with_a_precomputed_table_and_trimmed_padding(variant):
    """Serving path: the item table computed once, and all-padding columns dropped, change nothing."""
    model = make(variant)
    h = torch.full((3, MAX_LEN), N_ITEMS, dtype=torch.long)
    h[0, -3:] = torch.tensor([1, 2, 3])
    h[1, -1:] = torch.tensor([4])  # the batch's longest history is 3 items: 5 columns are padding for all
    u = users(3)
    with torch.no_grad():
        full = model(h, u)[0][:, -1]
        fast = model.user_vectors(h, u, table=model.item_tower())
    torch.testing.assert_close(fast, full)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_served_vectors_equal_the_training_paths_last_state(variant, seed):
    """`serve_user_vectors` (last layer for the newest query only, the mask broadcast over heads) gives the
    state the training forward computes at the last position, for histories from 1 item to over max_len."""
    model = make(variant, seed)
    h = histories(seed, n=9)
    u = users(9)
    with torch.no_grad():
        full = model(h, u)[0][:, -1]  # the training path: every position, every layer
        table = model.item_tower()
    served = model.serve_user_vectors(h, table, u)
    assert served.shape == (9, 16) and not served.requires_grad
    torch.testing.assert_close(served, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.serve_user_vectors(h[:1], table, u[:1]), full[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers, heads", [(1, 1), (3, 4)])
def test_served_vectors_equal_for_other_depths_and_heads(layers, heads):
    torch.manual_seed(layers)
    model = TwoTower(num_items=N_ITEMS, max_len=MAX_LEN, dim=16, num_layers=layers, num_heads=heads, dropout=0.3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        h = histories(3, n=7)
        full = model(h)[0][:, -1]
        table = model.item_tower()
        served = model.serve_user_vectors(h, table)
        alone = torch.cat([model.serve_user_vectors(h[i : i + 1], table) for i in range(len(h))])  # no padding left
    torch.testing.assert_close(served, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, full, rtol=1e-5, atol=1e-5)


def test_the_serving_computation_refuses_training_mode():
    model = make("transformer").train()
    with pytest.raises(RuntimeError, match="eval"):
        model.serve_user_vectors(histories(), model.item_tower().detach())


# ---------------------------------------------------------------- ids initialised from the teacher's item vectors


def test_content_init_is_the_scaled_principal_components():
    """Wide enough embeddings keep all the geometry of the centred vectors (Gram matrix up to one scale);
    narrower ones keep the top components, largest variance first; the padding row stays zero."""
    from llmkd.student import init_from_content

    g = np.random.default_rng(0)
    vectors = (g.normal(size=(40, 6)) * [5, 3, 2, 1, 0.5, 0.1] + 7.0).astype(np.float32)  # off-centre on purpose
    centred = vectors - vectors.mean(0)
    wide = torch.nn.Embedding(41, 10, padding_idx=40)
    with torch.no_grad():
        wide.weight[40].zero_()
    extra = wide.weight[:40, 6:].detach().clone()
    init_from_content(wide, vectors, std=0.05)
    w = wide.weight.detach().double().numpy()
    assert np.isclose(w[:40, :6].std(ddof=1), 0.05, rtol=1e-6)
    gram, want = w[:40, :6] @ w[:40, :6].T, centred @ centred.T
    assert np.allclose(gram, want * (gram.trace() / want.trace()), atol=1e-6)
    assert torch.equal(wide.weight[:40, 6:].detach(), extra) and not wide.weight[40].any()

    narrow = torch.nn.Embedding(41, 2, padding_idx=40)
    init_from_content(narrow, vectors, std=0.05)
    w = narrow.weight.detach().double().numpy()[:40]
    top = np.linalg.svd(centred, compute_uv=False)[:2] ** 2  # the two largest component variances
    assert w[:, 0].var() > w[:, 1].var()
    assert np.isclose(w[:, 0].var() / w[:, 1].var(), top[0] / top[1], rtol=1e-4)
    assert np.allclose(np.corrcoef(w.T)[0, 1], 0.0, atol=1e-6)  # principal components are uncorrelated


def test_whitened_content_init_gives_every_component_the_same_spread():
    """content_init_whiten: the same principal directions (each column correlates +-1 with the plain
    init's), each scaled to the same variance, overall std as asked; the plain init keeps the spectrum."""
    from llmkd.student import init_from_content

    g = np.random.default_rng(1)
    vectors = (g.normal(size=(200, 6)) * [5, 3, 2, 1, 0.5, 0.1]).astype(np.float32)
    plain, white = (torch.nn.Embedding(201, 4, padding_idx=200) for _ in range(2))
    init_from_content(plain, vectors, std=0.1)
    init_from_content(white, vectors, std=0.1, whiten=True)
    p, w = (e.weight.detach().double().numpy()[:200] for e in (plain, white))
    assert np.allclose(w.std(0, ddof=1), 0.1, rtol=1e-2) and np.isclose(w.std(ddof=1), 0.1, rtol=1e-6)
    assert np.ptp(w.std(0)) < 1e-9  # exactly equal spreads
    assert p.std(0)[0] > 3 * p.std(0)[3]  # without whitening the leading component dominates
    assert np.allclose(np.abs(np.corrcoef(p.T, w.T).diagonal(4)), 1.0)
    assert not white.weight[200].any()


def test_content_init_validation_and_factory():
    with pytest.raises(LlmkdError, match="student.content_init"):
        StudentConfig(content_init=-0.1)
    model = TwoTower.from_config(StudentConfig(dim=8, num_heads=2, content_init=0.1), num_items=5, max_len=4, num_users=3)
    assert model.item_tower.content_proj is None  # an initialisation only: no content path to serve with


def test_content_init_controls_keep_shape_and_scale_but_not_the_items_content():
    """'shuffled': the same rows (so the same spectrum and scale) on other items; 'random': Gaussian rows
    with the same column means and stds; neither keeps which vector belongs to which item."""
    from llmkd.student import content_init_vectors

    g = np.random.default_rng(123)  # not the controls' seed: the same stream would make 'random' equal the data
    vectors = (g.normal(size=(500, 6)) * [5, 3, 2, 1, 0.5, 0.1] + 7.0).astype(np.float32)
    assert content_init_vectors(vectors, "teacher", seed=0) is vectors
    shuffled = content_init_vectors(vectors, "shuffled", seed=0)
    assert np.allclose(np.sort(shuffled, 0), np.sort(vectors, 0))  # the same values per column
    spectrum = lambda x: np.linalg.svd(x - x.mean(0), compute_uv=False)
    assert np.allclose(spectrum(shuffled), spectrum(vectors), rtol=1e-4)
    assert (shuffled == vectors).all(1).mean() < 0.02  # (almost) every item got another item's vector
    random = content_init_vectors(vectors, "random", seed=0)
    assert random.shape == vectors.shape and random.dtype == np.float32
    assert np.allclose(random.mean(0), vectors.mean(0), atol=0.5) and np.allclose(random.std(0), vectors.std(0), rtol=0.1)
    own = [abs(np.corrcoef(x[:, 0], vectors[:, 0])[0, 1]) for x in (shuffled, random)]
    assert max(own) < 0.2  # no item keeps its own first coordinate
    assert not np.allclose(content_init_vectors(vectors, "random", seed=1), random)  # drawn per seed
    with pytest.raises(LlmkdError, match="content_init_source"):
        StudentConfig(content_init_source="bogus")


def test_init_std_sets_the_scale_of_the_random_id_init_and_the_default_changes_nothing():
    from llmkd.student import init_item_embedding

    torch.manual_seed(0)
    emb = torch.nn.Embedding(2001, 16, padding_idx=2000)
    with torch.no_grad():
        emb.weight[2000].zero_()
    before = emb.weight.detach().clone()
    init_item_embedding(emb, StudentConfig(), None, seed=0)
    assert torch.equal(emb.weight, before)  # 0.02: the constructor's draw is kept
    init_item_embedding(emb, StudentConfig(init_std=0.5), None, seed=0)
    assert emb.weight[:2000].std().item() == pytest.approx(0.5, rel=0.02) and not emb.weight[2000].any()


def test_the_sasrec_tower_is_sasrecs_shape():
    """SASRec's blocks as published: d -> d -> d feed-forward (not 4d), no MLP head after the last layer norm,
    Xavier-normal weights with zero biases, item vectors scaled by sqrt(d) (changing the scale changes the
    states). A pre-norm transformer block or a missing scale would fail it."""
    from llmkd.student.sasrec import SASRecEncoder

    d, L, layers = 16, MAX_LEN, 2
    model = TwoTower(num_items=N_ITEMS, max_len=L, dim=d, pooling="sasrec", num_layers=layers, num_heads=1)
    block = 2 * 2 * d + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + 2 * (d * d + d)  # norms, q, kv, out, ffn
    assert sum(p.numel() for p in model.user_tower.parameters()) == L * d + layers * block + 2 * d
    assert model.user_tower.mlp is None
    enc = model.user_tower.encoder
    assert isinstance(enc, SASRecEncoder) and all(not m.bias.any() for m in enc.modules()
                                                   if isinstance(m, torch.nn.Linear))
    h = histories()
    real = h != N_ITEMS
    seq = model.eval().item_tower()[h]
    with torch.no_grad():
        states = enc(seq, real)
        enc.scale *= 2
        assert not torch.allclose(enc(seq, real), states)


@pytest.mark.parametrize("lengths", [[1, 3, 8, 5], [2, 1, 4]])
def test_attend_padding_is_sasrecs_attention_over_pads_to_max_len(lengths):
    """SASRec pads every history to max_len, lets each query attend to the (zeroed) pads and zeroes them again
    after each block. `attend_padding` folds the pads into one key: the same states at every real position,
    and the same whatever all-padding columns a batch carries (training trims them, serving too)."""
    from llmkd.student.sasrec import SASRecEncoder

    torch.manual_seed(0)
    d, L, B = 16, MAX_LEN, len(lengths)
    enc = SASRecEncoder(d, L, num_layers=2, num_heads=2, dropout=0.0, attend_padding=True).eval()
    with torch.no_grad():
        for p in enc.parameters():  # non-zero biases: the pads' keys and values are the biases
            p.add_(0.2 * torch.randn_like(p))
    real = torch.arange(L)[None] >= (L - torch.tensor(lengths))[:, None]  # (B, L) left-padded
    seq = torch.randn(B, L, d) * real[..., None]
    causal = torch.ones(L, L, dtype=torch.bool).tril().expand(B, 1, L, L)
    with torch.no_grad():
        want = (seq * enc.scale + enc.position.weight) * real[..., None]
        for block in enc.blocks:  # the reference: SASRec's loop over the full width
            want = block(want, causal) * real[..., None]
        got = enc(seq, real)
        first = L - max(lengths)
        trimmed = enc(seq[:, first:], real[:, first:])
        enc.attend_padding = False
        masked = enc(seq, real)
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trimmed[real[:, first:]], want[real], rtol=1e-5, atol=1e-5)
    if min(lengths) < L:
        assert not torch.allclose(masked[real], want[real], atol=1e-3)  # masking the pads is another model


def test_attend_padding_needs_sasrec_pooling():
    with pytest.raises(LlmkdError, match="attend_padding"):
        StudentConfig(pooling="transformer", attend_padding=True)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if "mlp" not in v])  # (id_dropout draws differ per call)
@pytest.mark.parametrize("rows", [False, True])
def test_length_groups_give_the_full_width_states_and_gradients(variant, rows):
    """`length_groups`: the rows run in groups of similar length, each trimmed of its all-padding columns;
    the states at real positions and every gradient equal one full-width run's (what padded positions hold,
    no loss reads). A group scattered back to the wrong rows, or a trim that shifts positions, fails it."""
    h = histories(seed=3, n=9)
    real = h != N_ITEMS
    assert len(set(real.sum(1).tolist())) > 3 and real.all(1).any()  # lengths that differ, one fills the window
    out = {}
    for groups in (1, 4):
        model = make(variant)
        states, items = model(h, users(9), rows=rows, length_groups=groups)
        target = torch.randn(states.shape, generator=torch.Generator().manual_seed(0))
        ((states * target)[real].sum() + (items[torch.arange(N_ITEMS)] if rows else items).sum()).backward()
        out[groups] = states.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (full, full_grads), (grouped, grouped_grads) = out[1], out[4]
    assert torch.allclose(grouped[real], full[real], atol=1e-5)
    assert full_grads.keys() == grouped_grads.keys()
    for name, grad in full_grads.items():
        assert torch.allclose(grouped_grads[name], grad, atol=1e-5), name
