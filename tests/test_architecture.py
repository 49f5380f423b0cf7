"""The shape the README's Architecture section promises, checked from the source itself.

Every `import` and `from ... import` in src/shoal counts, the ones inside functions too (a lazy
import hides a circle from Python, not from the reader).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "shoal"
MAX_LINES = 500
# Packages at the bottom: they may import nothing else from shoal (shoal/__init__ is the version).
# engine_mlx is a sibling of engine: it may use the torch engine's scheduler and tokenizer.
LEAVES = {"schema": set(), "engine": {"schema"}, "engine_mlx": {"schema", "engine"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> Iterator[str]:
    """The shoal modules `path` imports (a `from pkg import mod` counts as pkg.mod)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("shoal"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("shoal"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield candidate if candidate in MODULES else base


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {m: {i for i in imports_of(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def room(module: str) -> str:
    """The part of shoal a module lives in: a subpackage, a top-level module, or "shoal" itself
    (shoal/__init__ holds only the version, which any room may read)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "shoal"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
    ],
)
def test_find_cycle_finds_exactly_the_circles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_no_module_imports_itself_round_a_circle():
    assert find_cycle(GRAPH) is None


def test_rooms_import_each_other_one_way_only():
    rooms: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        here = room(module)
        rooms.setdefault(here, set()).update({room(t) for t in targets} - {here, "shoal"})
    assert find_cycle(rooms) is None


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_bottom_packages_import_nothing_above_them(leaf):
    allowed = LEAVES[leaf] | {leaf, "shoal"}
    outside = {
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if room(m) == leaf
        for t in targets
        if room(t) not in allowed
    }
    assert not outside


def test_no_source_file_is_over_500_lines():
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in MODULES.values()}
    long = {path: n for path, n in lines.items() if n > MAX_LINES}
    assert not long, f"split these (one concern per module): {long}"


def third_party_imports(path: Path) -> Iterator[str]:
    """The top-level names of the non-shoal, non-stdlib modules `path` imports."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            if top != "shoal" and top not in sys.stdlib_module_names:
                yield top


def declared_distributions() -> set[str]:
    project = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {canonical(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_dependency_is_declared_in_pyproject():
    """An import that works only because another package pulled it in breaks on its next
    release (httpx2 came with huggingface_hub): every one is named in pyproject.toml."""
    providers = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    missing = {}
    for module, path in MODULES.items():
        for top in third_party_imports(path):
            dists = {canonical(d) for d in providers.get(top, [top])}
            if not dists & declared:
                missing.setdefault(top, []).append(module)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
