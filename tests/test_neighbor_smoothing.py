"""Label smoothing toward the teacher's item neighbours (llmkd.losses.neighbor_smoothing, distill.neighbor_smoothing)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llmkd.losses.neighbor_smoothing import item_neighbors, neighbor_smoothing_term


def test_neighbors_are_the_nearest_other_items_by_cosine():
    g = np.random.default_rng(0)
    x = g.normal(size=(300, 16)).astype(np.float32) * g.uniform(0.1, 10, size=(300, 1)).astype(np.float32)
    got = item_neighbors(x, 5, chunk=64).numpy()  # several chunks
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    want = np.argsort(-sim, axis=1)[:, :5]
    assert got.shape == (300, 5) and (got != np.arange(300)[:, None]).all()
    assert (got == want).mean() > 0.99  # (float ties aside) the exact top 5 by cosine, not by inner product


def test_the_term_turns_the_cross_entropy_into_the_smoothed_one():
    """CE + eps * term == cross-entropy against (1 - eps) one-hot + eps uniform over the target's neighbours."""
    g = torch.Generator().manual_seed(0)
    h, items = torch.randn(7, 8, generator=g), torch.randn(20, 8, generator=g)
    y = torch.randint(0, 20, (7,), generator=g)
    neighbors = torch.stack([torch.randperm(20, generator=g)[:4] for _ in range(20)])
    eps = 0.3
    soft = (1 - eps) * F.one_hot(y, 20).float()
    soft[torch.arange(7)[:, None], neighbors[y]] += eps / 4
    logits = h @ items.T
    want = F.cross_entropy(logits, soft)
    got = F.cross_entropy(logits, y) + eps * neighbor_smoothing_term(h, items, y, neighbors)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(F.cross_entropy(logits, y), want, atol=1e-3)  # the smoothing changes the loss


def test_the_trainer_smooths_toward_the_teachers_neighbours(tmp_path, synthetic, monkeypatch, teacher_items):
    """distill.neighbor_smoothing: the weights move away from the twin's (same seed); the control source
    ('shuffled') smooths toward other neighbours, so its weights differ again; 0 reads no teacher."""

    from llmkd import distill
    from llmkd.infra.config import Config, DistillConfig, StudentConfig
    from llmkd.student import TwoTower

    _, item_emb = teacher_items
    calls, real = [], distill.item_neighbors
    monkeypatch.setattr(distill, "item_neighbors", lambda v, *a: calls.append(v) or real(v, *a))
    weights = {}
    for name, eps, source in (("twin", 0.0, "teacher"), ("smooth", 0.5, "teacher"), ("control", 0.5, "shuffled")):
        cfg = Config(out_dir=str(tmp_path), data=synthetic.data_config(max_history=8),
                     student=StudentConfig(dim=8, num_layers=1, num_heads=1, dropout=0.0, content_init_source=source),
                     distill=DistillConfig(name=name, alpha=0.0, epochs=1, batch_size=64, neighbor_smoothing=eps,
                                           loss="full_softmax"))
        assert cfg.uses_teacher == (eps > 0)
        distill.train(cfg)
        weights[name] = TwoTower.from_pretrained(tmp_path / name).item_tower.embedding.weight.detach()
    assert len(calls) == 2 and calls[0] is item_emb and not np.allclose(calls[1], item_emb)
    assert not torch.allclose(weights["smooth"], weights["twin"], atol=1e-4)
    assert not torch.allclose(weights["control"], weights["smooth"], atol=1e-4)
