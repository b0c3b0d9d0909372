"""The layout: imports point one way (experiments -> tools -> phijax, never back), no module
imports itself through others, and modules stay small. Read from the source with `ast`; nothing
is imported or run."""
import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("phijax", "tools", "experiments")
LAYER = {"phijax": 0, "tools": 1, "experiments": 2}  # who may import whom: lower layers only


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The project module an import of `name` loads last (`a.b.c` -> `a.b.c`, or `a.b` when
    `c` is a name defined in `a.b`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """Project modules `module` imports anywhere in its source (functions included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in map(_target, names) if t and t != module)
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_the_graph_is_not_empty():
    assert {"phijax.model", "tools.pipeline", "tools.pts", "experiments.cli"} <= set(GRAPH)
    assert "phijax.model" in GRAPH["phijax.sampling"]  # the walk sees real imports


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    layer = LAYER[module.split(".")[0]]
    backwards = sorted(t for t in GRAPH[module] if LAYER[t.split(".")[0]] > layer)
    assert not backwards, f"{module} imports {backwards}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= 500, f"{module} has {lines} lines"
