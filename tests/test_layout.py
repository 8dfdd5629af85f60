"""The package's shape, as the architecture issue asks: no import circles, a small top level,
short files and functions, and producers that never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "embedq"
MAX_TOP_LEVEL_MODULES = 10
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every embedq module ``path`` imports, at any depth (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # ``from embedq.search import build`` imports the submodule embedq.search.build;
            # other names come from ``base`` itself.
            subs = {f"{base}.{a.name}" for a in node.names} & known
            found.update(subs if len(subs) == len(node.names) else {*subs, base})
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    graph = _graph()
    assert len(graph) > 40 and graph["embedq.app"], "the import graph was not read"
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_top_level_is_small_and_files_and_functions_are_short():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, sorted(top)
    long_files, long_functions = [], []
    for path in [*PACKAGE.rglob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]:
        source = path.read_text()
        if source.count("\n") > MAX_FILE_LINES:
            long_files.append(path.name)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long_files and not long_functions, (long_files, long_functions)


def test_producers_and_the_api_never_import_torch():
    # Producer hosts need no torch: importing what they run must not load it.
    code = (
        "import sys, embedq.producer, embedq.producer.bulk, embedq.producer.router, "
        "embedq.tasks, embedq.api, embedq.cli, embedq.ops.status\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout[:500]


def test_no_test_module_imports_another():
    # Shared test code lives in tests/helpers.py (and fixtures in conftest.py).
    offenders = [
        f"{path.name}: {line.strip()}"
        for path in sorted(ROOT.glob("tests/*.py"))
        for line in path.read_text().splitlines()
        if line.strip().startswith(
            ("from tests.test_", "import tests.test_", "from tests.conftest")
        )
    ]
    assert not offenders, offenders
