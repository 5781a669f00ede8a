"""Serving: a self-contained bundle from a trained student, a Python `Recommender`, an HTTP service.

This room imports only the student, the index and the base modules (artifacts, config, data ids),
never the teacher or training code, nor `transformers` / `peft`: a bundle loads and recommends with
torch, faiss and safetensors alone (tests/test_serving_layout.py holds it to that). Adding items from
their text needs the teacher, so it lives outside, in `llmkd.commands.add_items`.

Names are resolved lazily, so `import llmkd.serving` costs nothing until one is used.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Recommender": "llmkd.serving.recommender",
    "BadRequest": "llmkd.serving.recommender",
    "UnknownItems": "llmkd.serving.recommender",
    "export_bundle": "llmkd.serving.bundle",
    "append_items": "llmkd.serving.bundle",
    "serve": "llmkd.serving.server",
    "create_app": "llmkd.serving.http",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmkd.serving' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
