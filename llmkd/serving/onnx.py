"""The bundle's user tower as an ONNX graph, for serving stacks outside Python (ONNX Runtime, Triton).

    llmkd export-onnx BUNDLE               # writes BUNDLE/user_tower.onnx, checked against torch
    Recommender.from_pretrained(BUNDLE, backend="onnx")

The graph maps left-padded histories (B, L) int64 (vocabulary rows, padding = the number of items, any
B, 1 <= L <= the student's max_len) to user vectors (B, d) float32, the item table folded in as a
constant; the item side stays the FAISS index. It is exported with `torch.onnx.export(dynamo=True)`
from `TwoTower.serve_user_vectors(traced=True)`, the serving computation without its data-dependent
shortcuts, and kept only if ONNX Runtime reproduces torch on histories of every length.
Needs `pip install onnx onnxruntime onnxscript` (the `onnx` extra).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmkd.infra.artifacts import LlmkdError
from llmkd.serving.bundle import ONNX_FILE, STUDENT
from llmkd.serving.manifest import MANIFEST, add_to_manifest
from llmkd.student import TwoTower

TOLERANCE = 1e-4
"""Largest absolute difference allowed between ONNX Runtime's and torch's user vectors."""


class UserTowerGraph(nn.Module):
    """Histories (B, L) int64 -> user vectors (B, d): what serving computes, with the item table inside."""

    def __init__(self, model: TwoTower) -> None:
        super().__init__()
        self.model = model.eval()
        with torch.no_grad():
            self.register_buffer("table", model.item_tower().detach().clone())

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.model.serve_user_vectors(history, self.table, traced=True)


def require_runtime():
    try:
        import onnxruntime
    except ImportError as e:
        raise LlmkdError("the ONNX user tower needs onnxruntime (pip install onnx onnxruntime onnxscript, or the "
                         "'onnx' extra: pip install -e '.[onnx]')") from e
    return onnxruntime


def session(path: str | Path):
    """An ONNX Runtime session on `path`, on the CPU, with its default thread settings."""
    ort = require_runtime()
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def probe_histories(model: TwoTower, rng: np.random.Generator, batch: int = 5) -> list[torch.Tensor]:
    """Left-padded random histories of every length from 1 to max_len, some rows all padding but one item."""
    n, out = model.num_items, []
    for length in range(1, model.max_len + 1):
        h = rng.integers(0, n, size=(batch, length))
        for r in range(batch):
            h[r, : rng.integers(0, length)] = n  # pad the front of each row by a random amount
        out.append(torch.as_tensor(h, dtype=torch.int64))
    return out


def export_onnx(folder: str | Path) -> Path:
    """Write `folder/user_tower.onnx` from the bundle's student, after checking it against torch (a failed
    check writes nothing), and add it to the bundle's manifest (a new version id); returns its path."""
    folder = Path(folder)
    model = TwoTower.from_pretrained(folder / STUDENT).eval()  # bundles never hold user-id embeddings
    require_runtime()
    graph = UserTowerGraph(model).eval()
    example = torch.full((2, model.max_len), model.num_items, dtype=torch.int64)
    example[:, -1] = 0
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1, max=model.max_len)
    final = folder / ONNX_FILE
    tmp = folder / f".{ONNX_FILE}.tmp"
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporter's notes on absent torchvision ops and its progress lines
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(graph, (example,), input_names=["history"], output_names=["user_vectors"],
                                        dynamic_shapes={"history": {0: batch, 1: length}}, dynamo=True, verbose=False)
        program.save(str(tmp))
        worst = parity(graph, session(tmp), probe_histories(model, np.random.default_rng(0)))
        if worst > TOLERANCE:
            raise LlmkdError(f"{folder}: ONNX Runtime's user vectors differ from torch's by {worst:.2e} "
                             f"(> {TOLERANCE:g}); nothing written")
        os.replace(tmp, final)
        if (folder / MANIFEST).is_file():  # a bundle (not a bare student folder): it now vouches for the graph
            add_to_manifest(folder, ONNX_FILE)
    finally:
        quiet.setLevel(level)
        tmp.unlink(missing_ok=True)
    return final


def parity(graph: UserTowerGraph, sess, histories: list[torch.Tensor]) -> float:
    """Largest absolute difference between torch's and the session's user vectors over `histories`."""
    worst = 0.0
    with torch.inference_mode():
        for h in histories:
            ref = graph.model.serve_user_vectors(h, graph.table).numpy()  # the torch serving path, trim and all
            got = sess.run(None, {"history": h.numpy()})[0]
            worst = max(worst, float(np.abs(got - ref).max()))
    return worst


class OnnxUserTower:
    """`serve_user_vectors` through ONNX Runtime: (B, L) int64 histories -> (B, d) float32 numpy."""

    def __init__(self, path: str | Path) -> None:
        self.session = session(path)

    def __call__(self, history: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {"history": history.numpy()})[0]
