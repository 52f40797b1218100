"""The package's modules import each other without cycles, and the run side never reaches for the
export side to open a bundle.

The graph is read from the source with ``ast``, so nothing is imported. Counted: every import
statement that can run — at module level, inside functions and methods, inside ``try`` and ``if``
blocks — because a function-level import is still a dependency, only a later one (and the usual
way a cycle is hidden). Not counted: imports under ``if TYPE_CHECKING:`` (they never run), and
``importlib.import_module("...")`` strings (the backend registry's lazy loading; a string is not a
statement ``ast`` can resolve). An import of a submodule counts as an edge to that submodule, not
to the packages above it: their ``__init__`` runs first, but that is Python's doing, not a
dependency the importing code chose.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "mobile_export"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Modules that open or step an artifact (the run side); they must not import the backends.
RUN_SIDE = (
    "mobile_export.runtimes",
    "mobile_export.run",
    "mobile_export.reference",
    "mobile_export.evaluate",
    "mobile_export.fidelity",
    "mobile_export.devicelab.harness",
)


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name of every module under ``root`` (a package ``__init__`` is named by its folder)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node that can run (skips ``if TYPE_CHECKING:`` bodies)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = list(node.orelse)
        stack.extend(children)


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """``module -> modules of the package it imports``."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a non-module tail
                    target = target.rpartition(".")[0]
                if target.startswith(package) and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "mobile_export.runtimes" in graph and graph["mobile_export.run"], "the graph was not read"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_run_side_does_not_import_the_backends():
    graph = import_graph()
    offenders = {
        f"{name} -> {target}"
        for name, targets in graph.items()
        if any(name == side or name.startswith(side + ".") for side in RUN_SIDE)
        for target in targets
        if target == "mobile_export.backends" or target.startswith("mobile_export.backends.")
    }
    assert not offenders, sorted(offenders)


def test_cycles_through_function_level_and_relative_imports_are_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\nfrom . import b\n"
    )
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.sub.b"}  # the TYPE_CHECKING import never runs
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b"]]
