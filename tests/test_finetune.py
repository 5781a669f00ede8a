"""LoRA tuning of the teacher: the contrastive loss, the adapter artifact, adapter-keyed caches, bad input."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import Config, DistillConfig, FinetuneConfig, TeacherConfig
from llmkd.teacher import TeacherCache, TextEncoder, build_teacher_cache, resolve_model_path
from llmkd.teacher.finetune import contrastive_loss, finetune_teacher, lora_config


def test_contrastive_loss_hand_computed_with_duplicate_masking():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    bank = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    pos_ids = torch.tensor([5, 7])
    bank_ids = torch.tensor([5, 9])  # bank item 5 is row 0's own positive: masked for row 0 only
    T = 0.5
    got = contrastive_loss(q, p, pos_ids, bank, bank_ids, T).item()
    # row 0 candidates: p0 (1.0), p1 (1.0), bank0 masked, bank1 (0.6); target p0
    row0 = -(1.0 / T) + math.log(math.exp(1.0 / T) + math.exp(1.0 / T) + math.exp(0.6 / T))
    # row 1 candidates: p0 (0.0), p1 (0.0), bank0 (1.0), bank1 (0.8); target p1
    row1 = -(0.0 / T) + math.log(2 * math.exp(0.0) + math.exp(1.0 / T) + math.exp(0.8 / T))
    assert got == pytest.approx((row0 + row1) / 2, rel=1e-5)


def test_lora_config_top_layers_and_unknown_architecture(tiny_bert):
    from transformers import AutoConfig

    cfg = lora_config(AutoConfig.from_pretrained(tiny_bert), FinetuneConfig(top_layers=1))
    assert cfg.layers_to_transform == [1] and set(cfg.target_modules) >= {"query", "value"}

    class Odd:
        model_type = "unknown-arch"
        num_hidden_layers = 2

    with pytest.raises(LlmkdError, match="target_modules"):
        lora_config(Odd(), FinetuneConfig())


def _config(tmp_path, model, **finetune) -> Config:
    finetune = {"steps": 4, "eval_every": 2, "batch_size": 4, "catalog_negatives": 8, "patience": 5, **finetune}
    return Config(out_dir=str(tmp_path), teacher=TeacherConfig(model=str(model), batch_size=8,
                                                               max_history_items=5, max_history_tokens=64),
                  finetune=FinetuneConfig(**finetune), distill=DistillConfig(kd_top_k=10))


class LoraWatch:
    """Watches the LoRA weights `finetune_teacher` trains, without changing them: a spy on
    `peft.get_peft_model` keeps the PEFT model and its trainable weights as created, and a spy on
    `llmkd.teacher.finetune.ndcg_at_10` (called once per valid evaluation in one process) copies them at every
    evaluation, in the order of meta['curve']. Only the last model made is watched."""

    def __init__(self, monkeypatch) -> None:
        import peft

        from llmkd.teacher import finetune

        self.model, self.initial, self.at_eval = None, {}, []
        real_peft, real_ndcg = peft.get_peft_model, finetune.ndcg_at_10

        def get_peft_model(model, *args, **kwargs):
            self.model = real_peft(model, *args, **kwargs)
            self.initial, self.at_eval = self.trainable(), []
            return self.model

        def ndcg_at_10(*args, **kwargs):
            self.at_eval.append(self.trainable())
            return real_ndcg(*args, **kwargs)

        monkeypatch.setattr(peft, "get_peft_model", get_peft_model)
        monkeypatch.setattr(finetune, "ndcg_at_10", ndcg_at_10)

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def assert_trained_the_top_layer_only(self) -> None:
        """Every trainable weight is a LoRA weight of layer 1 (the top of 2) and moved from its initial
        value (lora_B starts at zero): a no-op optimizer leaves them all as created."""
        final = self.trainable()
        assert final and final.keys() == self.initial.keys()
        assert all(".lora_" in n and re.search(r"\.layers?\.1\.", n) for n in final), sorted(final)
        unmoved = [n for n in final if torch.equal(final[n], self.initial[n])]
        assert not unmoved, unmoved


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_finetune_writes_a_peft_adapter_that_changes_the_teacher(tmp_path, synthetic_data, fixture, request,
                                                                monkeypatch):
    """The adapter artifact (PEFT files, curve, plot). Training moves every LoRA weight of the top layer
    and no other; the exported adapter is exactly the weights at the best valid evaluation; and these
    settings (no warm-up: lr 5e-2 from the first step) keep a trained step, not step 0 (bert: step 2 of 4,
    an intermediate one; llama: step 4), so the exported adapter must change the teacher's vectors. A
    no-op optimizer fails all three."""
    from safetensors.torch import load_file

    model = request.getfixturevalue(fixture)
    watch = LoraWatch(monkeypatch)
    cfg = _config(tmp_path, model, top_layers=1, lr=5e-2, warmup_steps=0)
    meta = finetune_teacher(synthetic_data, cfg)
    folder = tmp_path / "teacher_lora"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert (folder / "valid_curve.png").is_file()
    assert [r["step"] for r in meta["curve"]] == [0, 2, 4] and len(watch.at_eval) == 3
    saved = json.loads((folder / "meta.json").read_text())
    curve = [r["valid_ndcg@10"] for r in saved["curve"]]
    assert saved["best_valid_ndcg_at_10"] == max(curve)
    best_at = curve.index(max(curve))  # the first best: a later tie is not an improvement
    assert saved["curve"][best_at]["step"] != 0, f"no trained step kept ({curve}): this test needs one"
    watch.assert_trained_the_top_layer_only()
    exported = load_file(folder / "adapter_model.safetensors")
    at_best = {n.replace(".default", ""): w for n, w in watch.at_eval[best_at].items()}
    assert exported.keys() == at_best.keys()
    assert all(torch.equal(exported[n], at_best[n]) for n in exported), "not the best evaluation's weights"
    # the adapter touches only the top layer; a trained one changes the vectors
    base = TextEncoder(str(model), batch_size=8).encode(synthetic_data.item_texts[:5], 32)
    tuned = TextEncoder(str(model), batch_size=8, adapter=folder).encode(synthetic_data.item_texts[:5], 32)
    assert tuned.shape == base.shape and np.isfinite(tuned).all()
    assert not np.allclose(tuned, base, atol=1e-6)
    adapter_cfg = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_cfg["layers_to_transform"] == [1]


def test_teacher_cache_is_keyed_on_the_adapter(tmp_path, synthetic_data, tiny_bert):
    cfg = _config(tmp_path, tiny_bert, steps=2, eval_every=1, lr=5e-2)
    finetune_teacher(synthetic_data, cfg)
    adapter = tmp_path / "teacher_lora"
    first = build_teacher_cache(synthetic_data, cfg.teacher, tmp_path / "teacher", adapter=adapter)
    assert first["reused"] is False and first["adapter_fingerprint"]
    assert build_teacher_cache(synthetic_data, cfg.teacher, tmp_path / "teacher", adapter=adapter)["reused"] is True
    # retrain the adapter in place (other seed): the cache must be rebuilt, not reused
    finetune_teacher(synthetic_data, _config(tmp_path, tiny_bert, steps=2, eval_every=1, lr=5e-2, seed=1))
    again = build_teacher_cache(synthetic_data, cfg.teacher, tmp_path / "teacher", adapter=adapter)
    assert again["reused"] is False and again["adapter_fingerprint"] != first["adapter_fingerprint"]
    no_adapter = build_teacher_cache(synthetic_data, cfg.teacher, tmp_path / "teacher")
    assert no_adapter["reused"] is False
    assert TeacherCache(tmp_path / "teacher", synthetic_data).item_emb.shape[0] == synthetic_data.num_items


def test_adapter_for_another_base_model_is_refused(tmp_path, synthetic_data, tiny_bert, tiny_gpt2):
    finetune_teacher(synthetic_data, _config(tmp_path, tiny_gpt2, steps=1, eval_every=1))
    with pytest.raises(LlmkdError, match="made for base model"):
        TextEncoder(str(tiny_bert), adapter=tmp_path / "teacher_lora")
    with pytest.raises(LlmkdError, match="adapter_config.json"):
        TextEncoder(str(tiny_bert), adapter=tmp_path / "nowhere")


def test_gguf_missing_or_not_gguf(tmp_path):
    with pytest.raises(LlmkdError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(LlmkdError, match="not a GGUF file"):
        resolve_model_path(str(fake))


def test_templates_need_their_placeholders():
    with pytest.raises(LlmkdError, match="history_template"):
        TeacherConfig(history_template="no placeholder")
    with pytest.raises(LlmkdError, match="item_template"):
        TeacherConfig(item_template="no placeholder")


def test_finetune_uses_train_split_only(synthetic_data):
    from llmkd.teacher.finetune import train_pairs

    pairs = train_pairs(synthetic_data)
    for u, t in pairs:
        assert 1 <= t < len(synthetic_data.train[u])
    assert len(pairs) == sum(max(len(s) - 1, 0) for s in synthetic_data.train)
    assert np.all(pairs[:, 0] >= 0)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_gpt2", "tiny_llama"])
def test_split_encoder_equals_the_whole_model(fixture, request):
    """Top layers run on cached lower-layer states give the vectors the whole model gives."""
    from peft import get_peft_model

    from llmkd.teacher.finetune import SplitEncoder

    enc = TextEncoder(str(request.getfixturevalue(fixture)), batch_size=3)
    enc.model = get_peft_model(enc.model, lora_config(enc.model.config, FinetuneConfig(top_layers=1)))
    enc.model.eval()
    texts = ["a short one", "a somewhat longer text about movies and more", "x", "Toy Story (1995)"]
    ids = enc.tokenize(texts, 32)
    split = SplitEncoder(enc, split=enc.model.config.num_hidden_layers - 1)
    cached = split.lower(ids, batch_size=2)
    assert [len(c) for c in cached] == [len(i) for i in ids]
    with torch.no_grad():
        whole = enc.embed(ids)
        parts = split.upper(ids, cached)
    assert torch.allclose(whole, parts, atol=2e-3), (whole - parts).abs().max()
    assert len(split.layers) == enc.model.config.num_hidden_layers  # the layer list is restored


def test_finetune_with_cached_lower_layers_trains_the_top(tmp_path, synthetic_data, tiny_bert, monkeypatch):
    """Cached lower layers: training draws from `cache_pairs` fixed cuts and moves every LoRA weight of the
    top layer (a no-op optimizer moves none). Over all cuts it trains like the uncached whole model: the
    same batches, so the same loss at every step, up to the float16 cache (< 1e-4 here); a cached run whose
    optimizer steps change nothing is > 1e-2 away from the second step on."""
    watch = LoraWatch(monkeypatch)
    cfg = _config(tmp_path, tiny_bert, top_layers=1, lr=5e-2, cache_pairs=20)
    meta = finetune_teacher(synthetic_data, cfg)
    assert meta["cached_lower_layers"] == 1 and meta["training_cuts"] == 20
    assert all(np.isfinite(r["train_loss"]) for r in meta["curve"][1:])
    watch.assert_trained_the_top_layer_only()
    common = {"top_layers": 1, "lr": 5e-2, "warmup_steps": 0}
    cached = finetune_teacher(synthetic_data, _config(tmp_path / "cached", tiny_bert, cache_pairs=0, **common))
    watch.assert_trained_the_top_layer_only()
    whole = finetune_teacher(synthetic_data, _config(tmp_path / "whole", tiny_bert, cache_lower_layers=False, **common))
    assert (cached["cached_lower_layers"], whole["cached_lower_layers"]) == (1, 0)
    from llmkd.teacher.finetune import train_pairs

    assert cached["training_cuts"] == whole["training_cuts"] == len(train_pairs(synthetic_data))  # the same cuts
    assert len(cached["step_losses"]) == len(whole["step_losses"]) == 4
    assert cached["step_losses"] == pytest.approx(whole["step_losses"], abs=1e-3)


def test_finetune_reuses_a_matching_adapter(tmp_path, synthetic_data, tiny_bert):
    cfg = _config(tmp_path, tiny_bert, steps=2, eval_every=1, lr=5e-2, top_layers=1)
    assert finetune_teacher(synthetic_data, cfg)["reused"] is False
    assert finetune_teacher(synthetic_data, cfg)["reused"] is True
    assert finetune_teacher(synthetic_data, cfg, force=True)["reused"] is False
    changed = _config(tmp_path, tiny_bert, steps=2, eval_every=1, lr=1e-2, top_layers=1)
    assert finetune_teacher(synthetic_data, changed)["reused"] is False
    assert json.loads((tmp_path / "teacher_lora" / "meta.json").read_text())["config"]["finetune"]["lr"] == 1e-2
