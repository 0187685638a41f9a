"""The house's layers, read from the code's own imports (every ``import`` and ``from ... import``
in the installed packages, at module level or inside functions).

Allowed: ``components`` (the science core) imports no platform package; ``common`` imports only
``components``; ``pipelines``, ``training`` and ``serving`` import ``components`` and
``common`` and never each other. The CLI module (``prism_cli``) sits on top. No module imports
itself back through a chain of others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "common", "pipelines", "training", "serving")
ALLOWED = {
    "components": {"components"},
    "common": {"components", "common"},
    "pipelines": {"components", "common", "pipelines"},
    "training": {"components", "common", "training"},
    "serving": {"components", "common", "serving"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules that ``path`` (module ``name``) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # ``from pkg import mod`` imports the module pkg.mod where one exists
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name inside a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(path, name, set(mods)) for name, path in mods.items()}


def test_the_graph_is_read():
    """A reader that found nothing would pass everything below: check it sees known edges."""
    g = graph()
    assert "components.generate" in g["components.artifact"]
    assert "common.shards" in g["training.streams"]
    assert "common.storage" in g["pipelines.data.ingest"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_against_the_layers(package):
    wrong = sorted(f"{m} -> {t}" for m, targets in graph().items()
                   if m.split(".")[0] == package
                   for t in targets if t.split(".")[0] not in ALLOWED[package])
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycle():
    """Tarjan's strongly connected components over the module graph: every one is a single
    module."""
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
