"""DESIGN.md's dependency direction: experiments → acquisition, agents → platform."""

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
