"""The teacher-runtime benchmark (llmkd.experiments.teacher_runtime): PyTorch, ONNX Runtime fp32 and int8 encode
the same texts; ONNX Runtime fp32 must give PyTorch's vectors and ranking, the quantised graph close ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")


def test_every_runtime_encodes_the_configs_texts_and_fp32_ranks_as_torch(tmp_path, synthetic, tiny_bert):
    from llmkd.data import build_data
    from llmkd.evaluation.metrics import mask_seen, metrics_from_ranks, target_ranks
    from llmkd.experiments.teacher_runtime import RUNTIMES, markdown, teacher_runtime_cost
    from llmkd.infra.config import Config, TeacherConfig
    from llmkd.teacher import TextEncoder, item_prompts, user_prompt

    data = build_data(synthetic.data_config())
    tc = TeacherConfig(model=str(tiny_bert), user_mode="text", batch_size=8, max_history_tokens=32)
    cfg = Config(out_dir=str(tmp_path), data=synthetic.data_config(), teacher=tc)
    result = teacher_runtime_cost(cfg, data, tmp_path, threads=1, reps=1, texts=16, users=20)
    rows = result["runtimes"]
    assert tuple(rows) == RUNTIMES and result["users"] == 20 < len(data.eval_users("valid"))
    assert (tmp_path / "teacher_fp32.onnx").is_file() and (tmp_path / "teacher_int8.onnx").is_file()
    assert rows["torch"]["speedup_items"] == 1.0 and rows["torch"]["cosine_min"] == pytest.approx(1.0, abs=1e-5)
    assert rows["onnxruntime_fp32"]["cosine_min"] > 0.9999  # the same graph: the same vectors
    assert rows["onnxruntime_fp32"]["valid_ndcg@10"] == pytest.approx(rows["torch"]["valid_ndcg@10"], abs=1e-6)
    assert 0.5 < rows["onnxruntime_int8"]["cosine_mean"] < 1.0  # quantised: near, not equal
    for name, r in rows.items():
        assert r["items_s"] > 0 and r["histories_s"] > 0, name
        assert np.isfinite(r["valid_ndcg@10"]) and 0 <= r["valid_ndcg@10"] <= 1, name
        assert r["paired_vs_torch"]["lo"] <= r["paired_vs_torch"]["mean"] <= r["paired_vs_torch"]["hi"], name
    # the torch row's NDCG is the teacher's own: TextEncoder.encode on the same users, scored independently
    rng = np.random.default_rng(0)
    pool = data.eval_users("valid")
    users = np.sort(rng.choice(pool, 20, replace=False))
    hists = [data.history(u, "valid") for u in users]
    enc = TextEncoder(str(tiny_bert), batch_size=8, device="cpu")
    items = torch.from_numpy(enc.encode(item_prompts(data.item_texts, tc), tc.max_item_tokens))
    states = torch.from_numpy(enc.encode([user_prompt(data.item_texts, h, tc) for h in hists], tc.max_history_tokens))
    ranks = target_ranks(mask_seen(states @ items.T, hists), torch.as_tensor(data.valid_item[users])).numpy()
    assert rows["torch"]["valid_ndcg@10"] == pytest.approx(float(metrics_from_ranks(ranks, (10,))["ndcg@10"].mean()))
    assert "onnxruntime_int8" in markdown(result)


def test_the_script_writes_the_json_and_the_table(tmp_path, synthetic, tiny_bert):
    """The command line end to end, on a prepared data folder (its keyword arguments reach the benchmark)."""
    import json

    import yaml
    from conftest import REPO, run_in_process

    from llmkd.data import build_data, save_data
    from llmkd.infra.config import Config, TeacherConfig

    cfg = Config(out_dir=str(tmp_path / "run"), data=synthetic.data_config(),
                 teacher=TeacherConfig(model=str(tiny_bert), user_mode="text", batch_size=8, max_history_tokens=32))
    save_data(build_data(cfg.data), tmp_path / "run" / "data", cfg.data)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    out = tmp_path / "runtime.json"
    proc = run_in_process(REPO / "scripts/benchmark_teacher_runtime.py",
                          ["--config", str(config), "--threads", "1", "--reps", "1", "--texts", "8", "--users", "10",
                           "--output", str(out)])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["users"] == 10 and result["texts"] == 8 and result["reps"] == 1
    assert "| onnxruntime_int8 |" in out.with_suffix(".md").read_text()
