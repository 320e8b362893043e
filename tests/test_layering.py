"""The packages' layering, read from the source: every import, the ones inside functions too (a lazy
import is how a cycle hides), but not those only for type checkers (`if TYPE_CHECKING:`)."""

from __future__ import annotations

import ast
from pathlib import Path

import duoserve

ROOT = Path(duoserve.__file__).parent


def _imported_modules(tree: ast.AST) -> list[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            node.body = []  # what only type checkers import is no dependency
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "duoserve imports absolutely"
            module = node.module or ""
            names += [f"{module}.{alias.name}" for alias in node.names] if module == "duoserve" else [module]
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def package_graph() -> dict[str, set[str]]:
    """duoserve's packages (engine, plan, ...) and top-level modules (cli, llm, config, ...), each with
    the others it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        source = path.relative_to(ROOT).with_suffix("").parts[0]
        edges = graph.setdefault(source, set())
        for name in _imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
            parts = name.split(".")
            if parts[0] == "duoserve" and len(parts) > 1 and parts[1] != source:
                edges.add(parts[1])
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in graph.get(stack.pop(), ()):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The groups of packages that import each other (directly or through others)."""
    reach = {node: reachable(graph, node) for node in graph}
    groups = set()
    for node in graph:
        group = frozenset({node} | {other for other in reach[node] if node in reach.get(other, ())})
        if len(group) > 1:
            groups.add(group)
    return groups


def test_the_engine_imports_no_planner_and_no_server():
    """The engine core's callers build what watches its steps (duoserve/engine/step_observer.py), as
    they build its KV connector: nothing the engine imports, even indirectly, is a planner or a server."""
    graph = package_graph()
    assert not {"plan", "server"} & reachable(graph, "engine")


def test_the_planner_imports_no_server_and_is_in_no_cycle():
    """plan reads the engine (its scheduler, KV accounting) and the router's policy; the server hands
    the planner's trace writer to its engine process as a value its caller built (cli.py)."""
    graph = package_graph()
    assert "server" not in graph["plan"] and "plan" not in graph["server"]
    assert not any("plan" in group for group in cycles(graph))


# The layers, lowest first: none imports one listed after it. The model's layers under the engine: the
# KV cache (which reads a model's shape, not its class), attention over it, the models (their LoRA
# linears too), LoRA's adapters (checked against a model's config); the engine, speculative decoding
# inside it (engine/spec); P/D's KV transfer and connectors (disagg), which the server's engine process
# runs; the server, with the routes routers call; the router, an engine client over servers; the
# planner (the engine's scheduler and the router's policy on a virtual clock); the offline API and the
# CLI, which compose them.
LAYERS = [
    "kv",
    "attention",
    "models",
    "lora",
    "config",
    "engine",
    "disagg",
    "server",
    "router",
    "bench",
    "plan",
    "llm",
    "cli",
]


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs in which a layer imports one listed after it."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return {
        (source, target)
        for source in LAYERS
        for target in graph.get(source, ())
        if rank.get(target, -1) > rank[source]
    }


def test_every_package_has_a_layer():
    packages = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file()}
    assert packages <= set(LAYERS), "a new package takes its place in LAYERS"


def test_no_layer_imports_a_higher_one():
    assert upward_imports(package_graph()) == set()


def test_upward_imports_are_seen():
    """The check can fail: a model importing the engine, even lazily, is an upward import and a cycle."""
    graph = {name: set(edges) for name, edges in package_graph().items()}
    graph["models"].add("engine")
    assert ("models", "engine") in upward_imports(graph)
    assert any({"models", "engine"} <= group for group in cycles(graph))


def test_no_package_cycle():
    assert cycles(package_graph()) == set()
