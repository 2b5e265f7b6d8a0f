"""The layers' import rule (docs/architecture.md): experiments → acquisition, agents → platform,
one way; and no import cycle between dubito's modules, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dubito

ROOT = Path(dubito.__file__).parent
# part -> parts of dubito it must not import
FORBIDDEN = {
    "platform": {"acquisition", "agents", "experiments", "cli"},
    "acquisition": {"agents", "experiments", "cli"},
    "agents": {"acquisition", "experiments", "cli"},
    "experiments": {"cli"},
}


def imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            bits = name.split(".")
            if bits[0] == "dubito" and len(bits) > 1:
                parts.add(bits[1])
    return parts


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_dependencies_point_one_way(part):
    files = sorted((ROOT / part).rglob("*.py"))
    assert files, part
    for path in files:
        bad = imported_parts(path) & FORBIDDEN[part]
        assert not bad, f"{path.relative_to(ROOT)} imports dubito.{sorted(bad)}"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """dubito modules ``path`` imports anywhere in it (top level or inside functions). ``from
    package import name`` counts as importing the module ``package.name`` where that is one."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in modules and m != me}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_function_level_imports_included():
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in files}
    # a package's __init__ is imported before any of its modules: an edge from a module to its own
    # package (or a package to the modules it re-exports) is how packages work, not a cycle
    graph = {}
    for path in files:
        me = module_name(path)
        graph[me] = {m for m in module_imports(path, modules) if not me.startswith(m + ".")}
    assert _cycles(graph) == []
    assert "dubito.acquisition.loop" in graph["dubito.acquisition"]  # the parser sees what it must


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
