"""LoRA tuning across processes: 2 CPU processes x batch B train as 1 process x batch 2B (the same global
batches, one scheduler step per optimizer step, gradients averaged), and the in-batch loss split by rows
equals the whole batch's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, free_port
from safetensors.numpy import load_file

from llmkd.data import build_data, save_data
from llmkd.infra.config import Config, from_dict
from llmkd.teacher.finetune import contrastive_loss, finetune_teacher
from llmkd.teacher.parallel import negatives_per_process


def test_the_loss_of_each_processs_rows_averages_to_the_global_batch_loss():
    """Rows 0-2 and 3-5 of a batch of 6, each against all 6 positives (offsets 0 and 3), average to the loss
    of the whole batch, duplicates masked the same way."""
    g = torch.Generator().manual_seed(0)
    q, p, n = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    pos_ids, neg_ids = torch.tensor([1, 2, 1, 3, 4, 5]), torch.tensor([2, 6, 7, 1, 8])
    whole = contrastive_loss(q, p, pos_ids, n, neg_ids, 0.1)
    halves = [contrastive_loss(q[o : o + 3], p, pos_ids, n, neg_ids, 0.1, offset=o) for o in (0, 3)]
    assert torch.allclose(whole, sum(halves) / 2, atol=1e-6)
    assert not torch.allclose(halves[0], halves[1])  # so the average above is not of two equal numbers
    assert negatives_per_process(8, 40, 2) == 4 and negatives_per_process(7, 40, 2) == 4
    assert negatives_per_process(8, 40, 1) == 8 and negatives_per_process(50, 40, 1) == 40
    assert negatives_per_process(50, 41, 2) == 20


def _raw(tmp_path, synthetic, tiny_bert, batch_size: int, output: str) -> dict:
    return {"out_dir": str(tmp_path / "run"),
            "data": {"source": "files", "interactions": str(synthetic.interactions), "items": str(synthetic.items),
                     "text_template": "{title} | {genre}", "max_history": 8},
            "teacher": {"model": str(tiny_bert), "batch_size": 3, "max_history_items": 5, "max_history_tokens": 64},
            "finetune": {"output": output, "steps": 6, "eval_every": 3, "batch_size": batch_size,
                         "catalog_negatives": 8, "patience": 5, "top_layers": 1, "lr": 0.05, "warmup_steps": 2,
                         "max_grad_norm": 0.5}}


def test_two_processes_of_batch_b_train_as_one_process_of_batch_2b(tmp_path, synthetic, tiny_bert):
    one = from_dict(Config, _raw(tmp_path, synthetic, tiny_bert, 8, "lora_1"))
    data = build_data(one.data)
    save_data(data, tmp_path / "run" / "data", one.data)
    ref = finetune_teacher(data, one)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path, synthetic, tiny_bert, 4, "lora_2")), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "llmkd", "finetune", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), "--", "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "run" / "lora_2" / "meta.json").read_text())
    assert (two["num_processes"], two["global_batch_size"], ref["num_processes"], ref["global_batch_size"]) == (2, 8, 1, 8)
    assert two["catalog_negatives_per_step"] == ref["catalog_negatives_per_step"] == 8
    # the loss of every step: the weights after each update, and the batches each step saw
    assert len(set(np.round(ref["step_losses"], 3))) > 3  # the steps differ, so a match below is not by chance
    np.testing.assert_allclose(two["step_losses"], ref["step_losses"], rtol=1e-4)
    assert [r["step"] for r in two["curve"]] == [r["step"] for r in ref["curve"]] == [0, 3, 6]
    np.testing.assert_allclose([r["valid_ndcg@10"] for r in two["curve"]], [r["valid_ndcg@10"] for r in ref["curve"]],
                               atol=1e-6)
    a = load_file(str(tmp_path / "run" / "lora_1" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "lora_2" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-4, rtol=1e-3, err_msg=k)  # Adam at lr 0.05 amplifies float noise


@pytest.mark.parametrize("processes", [1, 2])
def test_the_adapter_key_names_the_processes_only_when_several(processes, synthetic_data, tiny_bert, tmp_path):
    """An adapter tuned by one process keeps its old key (so it is reused as before); one tuned by two is
    not mistaken for it (their global batches differ)."""
    from llmkd.teacher.finetune import tuning_key

    cfg = from_dict(Config, {"out_dir": str(tmp_path), "teacher": {"model": str(tiny_bert)}})
    key = tuning_key(synthetic_data, cfg, processes)
    assert ("processes" in key) is (processes > 1) and "shard_size" not in key["teacher"]
