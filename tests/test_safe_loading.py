"""No unsafe deserialisation in the library or scripts (CONVENTIONS.md 3): no pickle, `torch.load` only
with `weights_only=True`, `np.load` never with `allow_pickle=True`.

The source is parsed (not grepped), so comments and docstrings that mention these names do not count,
and aliases (`from torch import load`, `import pickle as p`) do.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

SOURCES = sorted([*(REPO / "llmkd").rglob("*.py"), *(REPO / "scripts").rglob("*.py")])
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, name: str = "<source>") -> list[str]:
    """Each unsafe deserialisation in `source`, as 'name:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLERS:
                found.append(f"{line}: from {node.module} import ...")
            if module in ("torch", "numpy") and any(a.name == "load" for a in node.names):
                found.append(f"{line}: from {node.module} import load (call it as {module}.load)")
        elif isinstance(node, (ast.Attribute, ast.Name)):
            ident = node.attr if isinstance(node, ast.Attribute) else node.id
            if "pickle" in ident.lower():  # read_pickle, to_pickle, pickle.loads, ...
                found.append(f"{line}: {ident}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = node.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else None
            kw = {k.arg: k.value for k in node.keywords}
            if owner_name == "torch" and not _is_true(kw.get("weights_only")):
                found.append(f"{line}: torch.load without weights_only=True")
            if owner_name in ("np", "numpy") and "allow_pickle" in kw and not (
                    isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
                found.append(f"{line}: np.load with allow_pickle")
    return found


def test_sources_are_found():
    names = {str(p.relative_to(REPO)) for p in SOURCES}
    assert {"llmkd/data/__init__.py", "llmkd/teacher/__init__.py", "llmkd/student/__init__.py",
            "llmkd/distill/__init__.py", "scripts/prepare_data.py", "scripts/build_index.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(REPO)) for p in SOURCES])
def test_no_unsafe_loading(path: Path):
    assert unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(REPO))) == []


@pytest.mark.parametrize("source", [
    "import pickle",
    "import pickle as p",
    "from pickle import loads",
    "import joblib",
    "import pandas as pd\npd.read_pickle('x')",
    "import torch\ntorch.load('x')",
    "import torch\ntorch.load('x', weights_only=False)",
    "from torch import load",
    "import numpy as np\nnp.load('x', allow_pickle=True)",
    "import numpy\nnumpy.load('x', allow_pickle=flag)",
])
def test_checker_catches(source):
    assert unsafe_loads(source)


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load('x', weights_only=True)",
    "import numpy as np\nnp.load('x')",
    "import numpy as np\nnp.load('x', allow_pickle=False)",
    "from safetensors.torch import load_file\nload_file('x')",
    '"""Never pickle model state."""',
    "# torch.load(path) would be unsafe",
])
def test_checker_allows(source):
    assert unsafe_loads(source) == []
