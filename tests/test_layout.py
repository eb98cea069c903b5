"""The layers hold: processors <- transports <- agent <- bench, no import cycle, bench apart from tests.

Every ``import`` in the product packages and the benchmarks is read with :mod:`ast` (also those
inside functions and under ``TYPE_CHECKING``: they are dependencies all the same) and resolved
to a module of the repo. A lower layer importing a higher one, a cycle among product modules, or
a benchmark importing the tests fails here with the offending edges named.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = {"processors": 0, "transports": 1, "agent": 2, "bench": 3}


def modules() -> dict[str, Path]:
    found = {}
    for top in LAYERS:
        for path in (REPO / top).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "tests":
                    edges[name].add(target)
                elif (resolved := resolve(target)) and resolved != name:
                    edges[name].add(resolved)
    return edges


def layer(module: str) -> str:
    return module.split(".")[0]


def test_no_upward_import_and_bench_does_not_import_tests():
    edges = import_edges(modules())
    upward = sorted(
        f"{a} -> {b}" for a, targets in edges.items() for b in targets
        if layer(b) == "tests" or LAYERS[layer(b)] > LAYERS[layer(a)]
    )
    assert upward == [], "imports against the layers:\n" + "\n".join(upward)


def find_cycles(edges: dict[str, set[str]], nodes: set[str]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt not in nodes:
                continue
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(nodes):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycle():
    mods = modules()
    cycles = find_cycles(import_edges(mods), set(mods))
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    """The checks above would fail on what they look for (so their passing means something)."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a", "b", "c"}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}, {"a", "b"}) == []
    mods = modules()
    mods["processors.fake"] = REPO / "agent" / "bargein" / "strategy.py"  # imports agent.bargein.core
    edges = import_edges(mods)
    assert "agent.bargein.core" in edges["processors.fake"]


def test_the_decision_core_loads_neither_pipecat_nor_asyncio():
    code = ("import sys; import agent.bargein.core, agent.bargein.recording; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pipecat', 'asyncio', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
