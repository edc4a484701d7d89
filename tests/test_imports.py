"""No import cycles in the shipped packages (gateway, drivers, simulators), not even hidden inside a
function: the import graph is read from the source with ``ast``, every ``import`` and ``from ... import``
wherever it stands, and every strongly connected component of more than one module is a cycle.

What counts as an edge ``a -> b``: ``a`` imports ``b`` (``from b import name`` where ``b.name`` is a
module is an edge to ``b.name``), and to the packages above ``b`` whose ``__init__`` runs first —
except the packages that hold ``a`` itself (they are imported before ``a`` anyway). Not counted:
imports under ``if TYPE_CHECKING:`` (never executed), and imports of a name computed at run time
(``importlib.import_module(f"drivers.{name}")``: the driver registry's discovery of plugins).
"""

from __future__ import annotations

import ast
import importlib
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "drivers", "simulators")

ALLOWED: dict[frozenset[str], str] = {}
"""Cycles known and owned by a branch not yet merged, each exactly as found. Empty is the goal."""

Edges = dict[str, dict[str, int]]
"""module -> {imported module: line of the first import of it}."""


def modules(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return skipped


def import_graph(mods: dict[str, Path] | None = None) -> Edges:
    mods = modules() if mods is None else mods

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: Edges = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skipped = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        targets: list[tuple[str, int]] = []
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append((sub if sub in mods else base, node.lineno))
        edges: dict[str, int] = {}
        for target, line in targets:
            resolved = known(target)
            if resolved is None:
                continue  # the standard library or a dependency
            parts = resolved.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in mods and dep != name and dep not in own:
                    edges.setdefault(dep, line)
        graph[name] = edges
    return graph


def cycles(graph: Edges) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def describe(component: frozenset[str], graph: Edges, root: Path = REPO) -> str:
    """One cycle through the component, each step with the file and line of its import."""
    mods = modules(root, tuple({name.partition(".")[0] for name in graph}))
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:  # breadth first, within the component, back to the start
        node = queue.pop(0)
        for dep in sorted(graph[node]):
            if dep == start:
                steps = [*paths[node], start]
                return f"{len(component)} modules: {', '.join(sorted(component))}; one cycle: " + " -> ".join(steps) + "\n" + "\n".join(
                    f"    {mods[a].relative_to(root)}:{graph[a][b]}: imports {b}" for a, b in pairwise(steps))
            if dep in component and dep not in paths:
                paths[dep] = [*paths[node], dep]
                queue.append(dep)
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_the_shipped_packages_have_no_import_cycle() -> None:
    graph = import_graph()
    found = cycles(graph)
    new = [c for c in found if c not in ALLOWED]
    assert not new, ("import cycles (move the shared part into a module both can import, or pass it in):\n"
                     + "\n".join(describe(c, graph) for c in new))
    gone = [sorted(c) for c in ALLOWED if c not in found]
    assert not gone, f"these allowed cycles are gone: remove them from ALLOWED in {Path(__file__).name}: {gone}"


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    """The reader itself: imports inside functions and relative ones count, packages above the imported
    module count, TYPE_CHECKING ones do not."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg import b\n",
        "pkg/b.py": "from typing import TYPE_CHECKING\nfrom . import c\nif TYPE_CHECKING:\n    import pkg.a\n",
        "pkg/c.py": "import os\nfrom pkg.sub.d import thing\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from ..c import x\nthing = 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(modules(tmp_path, ("pkg",)))
    assert graph == {"pkg": {}, "pkg.a": {"pkg.b": 2}, "pkg.b": {"pkg.c": 2}, "pkg.c": {"pkg.sub": 2, "pkg.sub.d": 2},
                     "pkg.sub": {}, "pkg.sub.d": {"pkg.c": 1}}
    assert cycles(graph) == [frozenset({"pkg.c", "pkg.sub.d"})]
    assert describe(frozenset({"pkg.c", "pkg.sub.d"}), graph, tmp_path) == (
        "2 modules: pkg.c, pkg.sub.d; one cycle: pkg.c -> pkg.sub.d -> pkg.c\n"
        "    pkg/c.py:2: imports pkg.sub.d\n"
        "    pkg/sub/d.py:1: imports pkg.c")


def test_every_module_of_the_shipped_packages_imports() -> None:
    """A moved module leaves no import of its old path behind (ruff cannot tell a missing module)."""
    failed: list[str] = []
    for name in sorted(modules()):
        if name.endswith("__main__"):
            continue  # runs the CLI
        try:
            importlib.import_module(name)
        except Exception as exc:  # every kind of failure is the finding
            failed.append(f"{name}: {exc!r}")
    assert not failed, "\n".join(failed)
