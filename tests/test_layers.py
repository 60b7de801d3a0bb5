"""The import graph of src/tidegate: no cycle, and configuration that loads without the client.

The layering itself is import-linter's contracts in pyproject.toml (``make layers``); these
tests make a cycle, or a heavy import behind ``tidegate.config``, show in the test report too.
"""

from __future__ import annotations

import subprocess
import sys

import grimp


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_the_module_import_graph_has_no_cycle() -> None:
    # TYPE_CHECKING and function-level imports count: they are design dependencies too.
    graph = grimp.build_graph("tidegate", cache_dir=None)
    assert "tidegate.metrics" in graph.modules
    cycles = import_cycles(graph)
    assert not cycles, "import cycles in src/tidegate:\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_config_imports_neither_the_upstream_client_nor_the_exporter() -> None:
    heavy = ("aiohttp", "prometheus_client", "starlette", "torch", "tidegate.upstream.client")
    code = (
        "import sys, tidegate.config, tidegate.upstream.config; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "", f"importing tidegate.config imported {result.stdout}"
