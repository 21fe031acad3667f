"""The package's import graph has no cycles (lazy imports inside functions count too; TYPE_CHECKING ones don't).

A cycle means two modules each need the other: a change in one has to be made knowing the other,
and at import time the order decides which half-initialised module the other sees.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def import_graph(package: str = "kedit") -> dict[str, set[str]]:
    """``{module: modules of package it imports}`` from the source files' ASTs."""
    files = {_module_name(p): p for p in (SRC / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()

        def visit(node: ast.AST, mod=mod, is_pkg=is_pkg, deps=deps) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for c in child.orelse:
                        visit(c)
                    continue
                if isinstance(child, ast.Import):
                    deps.update(a.name for a in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                        anchor = anchor[: len(anchor) - (child.level - 1)]
                        base = ".".join([*anchor, base] if base else anchor)
                    for a in child.names:  # `from pkg import submodule` depends on the submodule
                        deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
                visit(child)

        visit(ast.parse(path.read_text(encoding="utf-8")))
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_checker_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_kedit():
    graph = import_graph()
    assert "kedit.stats" in graph and "kedit.corpus" in graph["kedit.stats"]  # the graph is really built
    assert find_cycles(graph) == []


def test_version_without_torch():
    """Reading ``kedit.__version__`` does not import torch or transformers."""
    code = "import sys, kedit; print(kedit.__version__); print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": ""}).stdout.split()
    assert out[-2:] == ["False", "False"], out


def test_public_names_match():
    """``kedit.__all__`` lists exactly the lazily imported public names, and each resolves."""
    import kedit

    assert sorted(kedit.__all__[1:]) == sorted(kedit._LAZY)
    assert all(getattr(kedit, name) is not None for name in kedit.__all__)
