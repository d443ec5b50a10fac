"""The package's shape, guarded: no import cycles (counting imports inside functions too, not those
under TYPE_CHECKING), no source file past 400 lines, and no torch on the paths that promise not to
import it (`dtm --help`, a native merge's modules)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dtm_fast"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """dtm_fast modules `path` imports anywhere except under `if TYPE_CHECKING:`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                submodules = {f"{base}.{alias.name}" for alias in child.names} & known
                found.update(submodules or {base})
            visit(child)

    visit(ast.parse(path.read_text()))
    resolved = set()
    for item in found:
        while item and item not in known:
            item = item.rpartition(".")[0]
        if item and item != name:
            resolved.add(item)
    return resolved


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(vertex: str) -> None:
        index[vertex] = low[vertex] = len(index)
        stack.append(vertex)
        on_stack.add(vertex)
        for target in sorted(graph[vertex]):
            if target not in index:
                strong(target)
                low[vertex] = min(low[vertex], low[target])
            elif target in on_stack:
                low[vertex] = min(low[vertex], index[target])
        if low[vertex] == index[vertex]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == vertex:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for vertex in sorted(graph):
        if vertex not in index:
            strong(vertex)
    return found


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_import_cycles():
    files = package_files()
    known = {module_name(path) for path in files}
    graph = {module_name(path): imported_modules(path, known) for path in files}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_source_file_is_longer_than_400_lines():
    roots = [PACKAGE, PACKAGE.parent / "kernels", PACKAGE.parent / "tests", PACKAGE.parent / "bench"]
    long = {str(path.relative_to(PACKAGE.parent)): count for root in roots for path in root.rglob("*")
            if path.suffix in (".py", ".h", ".cpp", ".cu") and (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_help_and_a_native_merge_import_no_torch():
    code = ("import sys, dtm_fast.cli as cli; cli.build_parser(); "
            "import dtm_fast.merge.engine, dtm_fast.merge.backends.cpu, dtm_fast.merge.sources; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
