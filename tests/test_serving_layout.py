"""The serving room (`llmkd/serving/`) imports only the student, the index and the base modules: never the
teacher or training code, nor transformers / peft, at module level or inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SERVING = REPO / "llmkd" / "serving"
ALLOWED_LLMKD = {"llmkd", "llmkd.infra.artifacts", "llmkd.infra.errors", "llmkd.infra.config",
                 "llmkd.infra.config_schema", "llmkd.infra.locks", "llmkd.infra.lineage", "llmkd.infra.paths",
                 "llmkd.data", "llmkd.student", "llmkd.student.sasrec", "llmkd.index"}
FORBIDDEN_PACKAGES = {"transformers", "peft", "accelerate", "datasets", "tokenizers", "sentence_transformers"}


def imports(path: Path, module_level_only: bool = False, package: str | None = None) -> set[str]:
    """Every module a file of `package` imports (`import a.b`, `from a.b import c` -> 'a.b'; relative
    imports resolved against `package`, by default the file's own under REPO)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else ast.walk(tree)
    package = package or ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
    return found


def module_path(name: str) -> Path:
    p = REPO / Path(*name.split("."))
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


def test_the_scanner_sees_function_level_and_relative_imports(tmp_path):
    """The check below would pass vacuously if the scanner missed imports inside functions."""
    f = tmp_path / "probe.py"
    f.write_text("def g():\n    from llmkd.teacher import TextEncoder\n    import peft\nfrom .bundle import x\n")
    assert imports(f, package="llmkd.serving") == {"llmkd.teacher", "peft", "llmkd.serving.bundle"}
    assert imports(f, module_level_only=True, package="llmkd.serving") == {"llmkd.serving.bundle"}


def test_serving_imports_only_student_index_and_base_modules():
    files = sorted(SERVING.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "bundle.py", "recommender.py", "http.py"}
    for f in files:
        for name in imports(f):
            if name == "llmkd" or name.startswith("llmkd."):
                assert name in ALLOWED_LLMKD or name.startswith("llmkd.serving"), f"{f.name} imports {name}"
            assert name.split(".")[0] not in FORBIDDEN_PACKAGES, f"{f.name} imports {name}"


def test_the_allowed_modules_reach_no_teacher_or_training_code_at_import():
    """Module-level imports, followed through llmkd: what importing the serving room pulls in."""
    todo, seen = [f"llmkd.serving.{f.stem}" for f in SERVING.glob("*.py") if f.stem != "__init__"], set()
    while todo:
        name = todo.pop()
        if name in seen or not module_path(name).is_file():
            continue
        seen.add(name)
        for dep in imports(module_path(name), module_level_only=True):
            assert dep.split(".")[0] not in FORBIDDEN_PACKAGES, f"{name} imports {dep} at module level"
            if dep.startswith("llmkd"):
                todo.append(dep)
    llmkd_modules = {m for m in seen if not m.startswith("llmkd.serving")}
    assert llmkd_modules <= ALLOWED_LLMKD, llmkd_modules - ALLOWED_LLMKD


def test_importing_the_http_service_loads_no_teacher_code():
    code = ("import sys, llmkd.serving.http, llmkd.serving.bundle, llmkd.serving.recommender\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'accelerate', 'datasets')\n"
            "       or m in ('llmkd.teacher', 'llmkd.distill', 'llmkd.teacher.finetune', 'llmkd.losses',\n"
            "                'llmkd.evaluation.report')]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
