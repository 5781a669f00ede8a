"""The modules of `llmkd` import one another without circles: every import counts, at module level or inside
a function (a deferred import only hides a circle until the function runs), so the layers can be read,
tested and loaded bottom-up."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of `package` (whose folder is `root`): dotted name -> file (`pkg/__init__.py` -> 'pkg')."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = (package, *f.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported(name: str, f: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that file `f` (module `name`) imports anywhere in it, functions included.
    `from a import b` means module `a.b` when that is a module, else `a`; relative imports are resolved.
    A parent package that Python imports on the way (`llmkd` for `llmkd.data`) is not counted: it is
    not a choice the importing module makes."""
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known and m != name}


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    known = module_names(root, package)
    return {name: imported(name, f, known) for name, f in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan), as [a, b, ..., a]."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.add(w)
            on_stack.discard(v)
            if component:
                components.append(component | {v})

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [circle_in(graph, c) for c in components]


def circle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path start -> ... -> start inside a strongly connected `component` (breadth first: a shortest one)."""
    start = min(component)
    paths = {w: [start, w] for w in sorted(graph[start] & component)}
    frontier = list(paths)
    while start not in paths:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return paths[start]


def test_the_scanner_sees_a_circle_through_a_function_level_import(tmp_path):
    """The check below would pass vacuously if the scanner missed imports inside functions or relative ones."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .c import x\n")
    (pkg / "sub" / "c.py").write_text("import os\nx = 1\ndef g():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\nfrom . import sub\n")
    graph = import_graph(pkg, "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.sub.b"}, "pkg.d": {"pkg.a", "pkg.sub"}, "pkg.sub": set(),
                     "pkg.sub.b": {"pkg.sub.c"}, "pkg.sub.c": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]]
    (pkg / "sub" / "c.py").write_text("x = 1\n")
    assert cycles(import_graph(pkg, "pkg")) == []


def test_llmkd_has_no_import_cycles():
    graph = import_graph(REPO / "llmkd", "llmkd")
    assert {"llmkd.infra.artifacts", "llmkd.infra.locks", "llmkd.serving.http"} <= set(graph)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


# ---------------------------------------------------------------- rooms (docs/architecture.md)

DOC = REPO / "docs" / "architecture.md"


def documented_rooms(text: str) -> tuple[list[str], dict[str, str], set[tuple[str, str]]]:
    """From docs/architecture.md: the rooms bottom to top (its `rooms:` line), module -> room (the rows
    "| `llmkd.x` | room | ... |"), and the upward imports it lists as still to move ("- `a -> b`")."""
    order = [r.strip() for r in re.search(r"^rooms: (.+)$", text, re.MULTILINE).group(1).split(",")]
    room = dict(re.findall(r"^\| `(llmkd[\w.]*)` \| (\w+) \|", text, re.MULTILINE))
    upward = set(re.findall(r"^- `(llmkd[\w.]*) -> (llmkd[\w.]*)`", text, re.MULTILINE))
    return order, room, upward


def upward_imports(graph: dict[str, set[str]], order: list[str], room: dict[str, str]) -> set[tuple[str, str]]:
    """Imports from a module to one in a higher room (the package `llmkd` itself sits above every room)."""
    rank = {r: i for i, r in enumerate(order)}
    return {(a, b) for a, targets in graph.items() if a != "llmkd" for b in targets
            if rank[room[b]] > rank[room[a]]}


def test_the_architecture_doc_places_every_module_in_one_room():
    graph = import_graph(REPO / "llmkd", "llmkd")
    order, room, _ = documented_rooms(DOC.read_text(encoding="utf-8"))
    assert len(order) == len(set(order)) >= 8
    modules = set(graph) - {"llmkd"}
    assert modules - set(room) == set(), "modules missing from docs/architecture.md"
    assert set(room) - modules == set(), "docs/architecture.md lists modules that do not exist"
    assert set(room.values()) <= set(order), set(room.values()) - set(order)


def test_imports_go_down_the_rooms_except_the_listed_ones():
    """A new import from a lower room to a higher one fails here (move the shared piece down, or list it in
    docs/architecture.md with how it will move); a listed one that is gone must be struck from the list."""
    graph = import_graph(REPO / "llmkd", "llmkd")
    order, room, listed = documented_rooms(DOC.read_text(encoding="utf-8"))
    found = upward_imports(graph, order, room)
    assert found - listed == set(), "imports up a room: " + ", ".join(f"{a} -> {b}" for a, b in sorted(found - listed))
    assert listed - found == set(), "listed as upward but no longer imported: " + str(sorted(listed - found))


def test_the_room_check_sees_an_upward_import():
    graph = {"p.low": {"p.high"}, "p.high": set()}
    assert upward_imports(graph, ["infra", "commands"], {"p.low": "infra", "p.high": "commands"}) == {
        ("p.low", "p.high")}
    assert upward_imports(graph, ["commands", "infra"], {"p.low": "infra", "p.high": "commands"}) == set()
