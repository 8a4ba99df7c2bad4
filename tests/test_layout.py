"""The package's layout: no import cycle among dd_jax's modules (imports inside functions
included), and the library never imports the experiments or benchmarks built on it."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dd_jax"


def imports(path: Path) -> set[str]:
    """The top-level packages and dd_jax modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            parts = name.split(".")
            found.add(".".join(parts[:2]) if parts[0] == "dd_jax" and len(parts) > 1 else parts[0])
        if isinstance(node, ast.ImportFrom) and node.module == "dd_jax":  # from dd_jax import x
            found |= {f"dd_jax.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
    return found


def module_graph() -> dict[str, set[str]]:
    """dd_jax module -> the dd_jax modules it imports (the package's __init__ left out: it
    imports the public names of every stage)."""
    modules = {f"dd_jax.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {m: imports(p) & modules.keys() for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None if it has none (depth-first search)."""
    state: dict[str, str] = {}  # 'open' while on the stack, 'done' after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_dd_jax():
    graph = module_graph()
    assert {"dd_jax.outer", "dd_jax.outer_step", "dd_jax.meta", "dd_jax.inner"} <= graph.keys()
    assert "dd_jax.meta" in graph["dd_jax.outer_step"]  # the graph sees the imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_library_imports_no_experiment_or_benchmark():
    for path in PACKAGE.glob("*.py"):
        assert not imports(path) & {"experiments", "benchmarks"}, path.name
