"""The package's layering, read from its source: the command line at the edge, optimize/ and
evaluate/ apart from merge/, and no import cycle but the merge-method registry's.

Imports are collected from the syntax tree, those inside functions included (they run when the
function does) and those under ``if TYPE_CHECKING:`` left out (they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "evomerge"

ALLOWED_CYCLES = [
    # The method registry imports the built-in methods to fill itself; each registers there.
    {"evomerge.merge.registry", "evomerge.merge.methods"}
    | {
        f"evomerge.merge.methods.{p.stem}"
        for p in (PACKAGE / "merge" / "methods").glob("*.py")
        if p.stem != "__init__"
    },
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports when its code runs (absolute names)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {dep for dep in _imports(path, name) if dep in modules and dep != name}
        | {dep for dep in _imports(path, name) if not dep.startswith("evomerge")}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    inside = {n: sorted(d for d in deps if d in graph) for n, deps in graph.items()}
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(inside[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                        found.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(inside[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_only_the_command_line_imports_argparse_or_the_command_line() -> None:
    edge = ("evomerge.cli", "evomerge.__main__")
    offenders = sorted(
        f"{name} imports {dep}"
        for name, deps in _graph().items()
        if not name.startswith(edge)
        for dep in deps
        if dep == "argparse" or dep == "evomerge.cli" or dep.startswith("evomerge.cli.")
    )
    assert offenders == []


def test_optimize_and_evaluate_stand_apart_from_merge() -> None:
    offenders = sorted(
        f"{name} imports {dep}"
        for name, deps in _graph().items()
        if name.startswith(("evomerge.optimize", "evomerge.evaluate"))
        for dep in deps
        if dep == "evomerge.merge" or dep.startswith("evomerge.merge.")
    )
    assert offenders == []


def test_no_import_cycle_but_the_method_registry() -> None:
    unexpected = [
        sorted(cycle)
        for cycle in _cycles(_graph())
        if not any(cycle <= allowed for allowed in ALLOWED_CYCLES)
    ]
    assert unexpected == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [{"a", "b", "c"}]


def test_the_command_line_starts_without_the_library() -> None:
    """Building the whole parser (what ``--help`` and ``--version`` do) loads no heavy package."""
    heavy = ["torch", "numpy", "sqlalchemy", "pydantic", "matplotlib", "ray", "optuna", "yaml"]
    code = (
        "import sys; import evomerge.cli as c; c.build_parser(); "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
