"""The house's layers, read from the code's own imports (every ``import`` and ``from ... import``
in the installed packages, at module level or inside functions).

Allowed: ``components`` (the science core) imports no platform package; ``common`` imports only
``components``; ``pipelines``, ``training`` and ``serving`` import ``components`` and
``common`` and never each other. The CLI module (``prism_cli``) sits on top. No module imports
itself back through a chain of others.

Imports sit at the top of a module. A module that defers some to a function on purpose (a heavy
or optional dependency its other users must not pay for, the CLI's start-up time) says why once,
in a ``# deferred:`` comment at its first deferred import, and defers nothing that its top
already loads.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import io
import tokenize
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


def package_of(path: Path) -> str:
    """The package that relative imports in ``path`` start from."""
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def from_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of ``from ... import``, a relative one resolved against ``package``."""
    base = node.module or ""
    if node.level:
        up = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*up, base] if base else up)
    return base


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules that ``path`` (module ``name``) imports, anywhere in its body."""
    package = package_of(path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = from_base(node, package)
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


# ------------------------------------------------------------------ imports deferred on purpose

SOURCES = (*PACKAGES, "prism_cli.py", "benchmarks")
DEFERRED = "# deferred:"
Import = ast.Import | ast.ImportFrom


def source_files() -> list[Path]:
    return sorted(p for s in SOURCES for p in
                  ([ROOT / s] if s.endswith(".py") else (ROOT / s).rglob("*.py")))


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def split_imports(tree: ast.Module) -> tuple[list[Import], list[Import]]:
    """(the imports that run when the module loads, the imports inside functions); the body
    of ``if TYPE_CHECKING:`` is in neither, it never runs."""
    top: list[Import] = []
    inner: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, Import):
                (inner if in_function else top).append(child)
            elif isinstance(child, ast.If) and _type_checking(child.test):
                for stmt in child.orelse:
                    visit(stmt, in_function)
            else:
                visit(child, in_function or isinstance(
                    child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    return top, inner


@functools.cache
def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package on disk; nothing is imported to tell."""
    top, _, rest = name.partition(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: found, not imported
    except (ImportError, ValueError):
        return False
    if spec is None or not rest:
        return spec is not None
    for base in spec.submodule_search_locations or ():
        path = Path(base, *rest.split("."))
        if path.is_dir() or any(path.parent.glob(f"{path.name}.*")):
            return True
    return False


def deferred_modules(node: Import, package: str) -> list[str]:
    """The modules an import loads: ``import a.b`` -> a.b; ``from a import b, c`` -> a.b and
    a.c where they are modules, else a."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = from_base(node, package)
    return [f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")] or [base]


def loaded(nodes: list[Import], package: str) -> set[str]:
    """Every module these imports load, parent packages included; ``from a import b`` counts
    a.b too, since b may be a submodule."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        else:
            base = from_base(node, package)
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def top_loaded() -> dict[Path, set[str]]:
    """Per source file: what loading it loads, through the top imports of the project modules
    it imports at its top, transitively."""
    direct = {p: loaded(split_imports(ast.parse(p.read_text(), str(p)))[0], package_of(p))
              for p in source_files()}
    files = {module_name(p): p for p in direct}
    closed: dict[Path, set[str]] = {}

    def close(path: Path, seen: frozenset[Path]) -> set[str]:
        if path not in closed:
            out = set(direct[path])
            for name in direct[path]:
                dep = files.get(name)
                if dep is not None and dep != path and dep not in seen:
                    out |= close(dep, seen | {path})
            closed[path] = out
        return closed[path]

    return {p: close(p, frozenset()) for p in direct}


def deferred_comments(source: str) -> list[int]:
    """The lines of the comments that start with ``# deferred:``."""
    return [tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT and tok.string.startswith(DEFERRED)]


def comment_block_above(lines: list[str], lineno: int) -> range:
    """The line ``lineno`` and the comment lines (or a ``try:``) right above it, 1-based."""
    first = lineno
    while first > 1 and lines[first - 2].strip().startswith(("#", "try:")):
        first -= 1
    return range(first, lineno + 1)


def deferral_problems(path: Path, at_top: set[str]) -> list[str]:
    source = path.read_text()
    lines = source.splitlines()
    package, where = package_of(path), path.relative_to(ROOT)
    inner = sorted(split_imports(ast.parse(source, str(path)))[1], key=lambda n: n.lineno)
    comments = deferred_comments(source)
    if not inner:
        return [f"{where}:{c}: a {DEFERRED} comment, but nothing is deferred" for c in comments]
    problems = [f"{where}:{n.lineno}: {', '.join(deferred_modules(n, package))}: loaded by "
                "the module's top already, import it there" for n in inner
                if set(deferred_modules(n, package)) <= at_top]
    if not comments:
        problems += [f"{where}:{n.lineno}: {', '.join(deferred_modules(n, package))}: imported "
                     f"in a function, move it to the top or say why once ({DEFERRED} ...)"
                     for n in inner]
    elif len(comments) > 1:
        problems.append(f"{where}: {DEFERRED} at lines {comments}: say why once")
    elif comments[0] not in comment_block_above(lines, inner[0].lineno):
        problems.append(f"{where}:{comments[0]}: {DEFERRED} belongs at the first deferred "
                        f"import (line {inner[0].lineno})")
    return problems


def test_the_deferred_imports_are_read():
    """A reader that found nothing would pass the test below: check it sees a known one."""
    storage = ROOT / "common" / "storage.py"
    inner = split_imports(ast.parse(storage.read_text()))[1]
    assert ["boto3"] in [deferred_modules(n, "common") for n in inner]
    assert "mlflow" in top_loaded()[ROOT / "training" / "tracking.py"]  # via common.registry


def test_imports_are_at_the_top_unless_deferred_on_purpose():
    at_top = top_loaded()
    problems = [p for path in source_files() for p in deferral_problems(path, at_top[path])]
    assert not problems, "imports deferred without a reason given:\n" + "\n".join(problems)
