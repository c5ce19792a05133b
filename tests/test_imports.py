"""The package's modules import each other one way: no circle, and nothing from the core (the algorithm: targets,
importance, the derivation, masks, adapters) up into the harness (config, runs, records, protocol), lazy and
type-only imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "partial_lora"
CORE = ("partial_lora.adapters", "partial_lora.importance", "partial_lora.masks", "partial_lora.ratios")
# What the core may import beside itself: the leaves below it (errors, file plumbing, where a layer sits).
LEAVES = ("partial_lora.errors", "partial_lora.files", "partial_lora.layers")


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it names in any import statement, wherever in the file it sits."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in modules.items():
        named = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                named |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                named |= {alias.name for alias in node.names}
        graph[module] = {name for name in named if name in modules and name != module}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as the modules along it, or ``None``."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module)):
            return circle
    return None


def in_core(module: str) -> bool:
    return any(module == core or module.startswith(f"{core}.") for core in CORE)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(importer, imported)`` for each import from a core module into anything but the core and its leaves."""
    return sorted((module, target) for module, targets in graph.items() if in_core(module)
                  for target in targets if not in_core(target) and target not in LEAVES)


def test_the_package_has_no_import_circle():
    assert find_circle(import_graph()) is None


def test_a_circle_is_found_where_there_is_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_the_core_imports_nothing_from_the_harness():
    graph = import_graph()
    assert {"partial_lora.masks", "partial_lora.ratios.derive", "partial_lora.adapters.targets"} <= graph.keys()
    assert upward_imports(graph) == []


def test_an_upward_import_is_found_where_there_is_one():
    graph = {"partial_lora.ratios.cache": {"partial_lora.results.record", "partial_lora.files"},
             "partial_lora.masks": {"partial_lora.errors"}, "partial_lora.config": {"partial_lora.masks"}}
    assert upward_imports(graph) == [("partial_lora.ratios.cache", "partial_lora.results.record")]
