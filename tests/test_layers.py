"""The engine's layering, read from the source: no import cycles, no upward imports, no hidden ones.

Every import in the package is walked, function-level ones included, so a dependency cannot hide
inside a function body. The layer order is declared once, in `minigpt_cli.engine.LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from minigpt_cli.engine import LAYERS

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "minigpt_cli"
# An engine module may import these without a rank: they sit beneath every layer.
BELOW_ENGINE = ("minigpt_cli.errors", "minigpt_cli.config", "minigpt_cli.datasets", "minigpt_cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def known_names(modules: dict[str, Path]) -> set[str]:
    """Module names, plus `<package>.__init__` markers so relative imports resolve from packages."""
    packages = {f"{name}.__init__" for name, path in modules.items() if path.name == "__init__.py"}
    return set(modules) | packages


def imported_modules(node: ast.AST, importer: str, known: set[str]) -> list[str]:
    """The package modules one import statement reaches (`from pkg import mod` names the module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("minigpt_cli")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = importer if f"{importer}.__init__" in known else importer.rsplit(".", 1)[0]
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    if not source.startswith("minigpt_cli"):
        return []
    found = []
    for alias in node.names:
        child = f"{source}.{alias.name}"
        found.append(child if child in known else source)
    return found


def is_type_checking_block(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)


def import_edges() -> dict[str, list[tuple[str, int, bool]]]:
    """importer -> [(imported module, line, at module top)] for every import run at import time.

    `if TYPE_CHECKING:` imports never run, so they close no cycle; they are left out.
    """
    modules = all_modules()
    known = known_names(modules)
    edges: dict[str, list[tuple[str, int, bool]]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_only = {
            id(node)
            for stmt in tree.body
            if is_type_checking_block(stmt)
            for node in ast.walk(stmt)
        }
        top_level = {id(n) for n in tree.body}
        found = []
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            for target in imported_modules(node, name, known):
                if target != name:
                    found.append((target, node.lineno, id(node) in top_level))
        edges[name] = found
    return edges


def engine_package(module: str) -> str | None:
    """'minigpt_cli.engine.stages.sft' -> 'stages'; None outside the engine."""
    parts = module.split(".")
    if parts[:2] != ["minigpt_cli", "engine"] or len(parts) < 3:
        return None
    return parts[2]


def rank_of(package: str) -> int:
    for rank, names in enumerate(LAYERS):
        if package in names:
            return rank
    raise AssertionError(f"engine package {package!r} is not declared in engine.LAYERS")


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively; components of more than one module are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def test_no_import_cycles_between_modules() -> None:
    """Function-level imports included: a cycle hidden in a function body is still a cycle."""
    graph = {name: {target for target, _, _ in found} for name, found in import_edges().items()}
    # A package's __init__ is reached by importing any of its modules; it must not close a loop.
    assert strongly_connected(graph) == []


def test_every_engine_package_is_declared_once_in_the_layer_table() -> None:
    declared = [name for names in LAYERS for name in names]
    assert len(declared) == len(set(declared))
    present = {engine_package(m) for m in all_modules()} - {None}
    assert present == set(declared)


def test_engine_modules_import_only_lower_layers_or_their_own_package() -> None:
    upward = []
    for importer, found in import_edges().items():
        own = engine_package(importer)
        if own is None:
            continue
        for target, line, _ in found:
            if target.startswith(BELOW_ENGINE) and not target.startswith("minigpt_cli.engine"):
                if target.startswith("minigpt_cli.cli"):
                    upward.append(f"{importer}:{line} imports the CLI ({target})")
                continue
            other = engine_package(target)
            if other is None or other == own:
                continue
            if rank_of(other) >= rank_of(own):
                upward.append(f"{importer}:{line} ({own}) imports {target} ({other})")
    assert upward == []


@pytest.mark.parametrize("package", ["minigpt_cli.config", "minigpt_cli.datasets"])
def test_config_and_builtin_data_import_nothing_from_the_engine_or_cli(package: str) -> None:
    reaching = [
        f"{importer}:{line} imports {target}"
        for importer, found in import_edges().items()
        if importer.startswith(package)
        for target, line, _ in found
        if target.startswith(("minigpt_cli.engine", "minigpt_cli.cli"))
    ]
    assert reaching == []


def test_lazy_engine_imports_say_why() -> None:
    """Imports sit at module top; one inside a function carries a `# lazy:` comment saying why."""
    unexplained = []
    for name, found in import_edges().items():
        if engine_package(name) is None:
            continue
        lines = all_modules()[name].read_text(encoding="utf-8").splitlines()
        for _, line, at_top in found:
            if at_top:
                continue
            here, above = lines[line - 1], lines[line - 2] if line > 1 else ""
            if "# lazy:" not in here and "# lazy:" not in above:
                unexplained.append(f"{name}:{line}: {here.strip()}")
    assert sorted(set(unexplained)) == []


def test_the_walk_sees_function_level_imports_and_cycles() -> None:
    """The checker itself: a cycle through a function-level import is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from minigpt_cli.engine.runs import checkpoint\n")
    inner = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)][0]
    known = {"minigpt_cli.engine.runs.checkpoint"}
    assert imported_modules(inner, "minigpt_cli.engine.x", known) == [
        "minigpt_cli.engine.runs.checkpoint"
    ]
