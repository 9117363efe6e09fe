"""Check the import graph of `grpo_jax/`: no cycles, and nothing imports the training run.

    python -m tests.tools.import_graph          # exit 0 when clean, 1 with a report otherwise

Files are parsed with `ast`, never imported, so a broken or heavy module cannot hide an edge.
Every import counts, at module level and inside functions alike: a deferred import still
means the two modules need each other, it only moves the crash from import time to call time.
Imports under `if TYPE_CHECKING:` do not count (they never run). A package's `__init__`
importing its submodules is an ordinary edge, but the implicit "a submodule needs its
parent's `__init__`" is not added: it would turn every re-exporting package into a cycle.

Second rule: no module of the package imports `<package>.loop` (the training run);
only the CLI in `launch/` may, so library code never depends on the thing it is a part of.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Graph:
    """Modules of one package, their files, and `edges[importer][imported] = [line, ...]`."""

    package: str
    files: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def where(self, a: str, b: str) -> str:
        """`file:line[,line]` of the imports of `b` in `a`, for the report."""
        path = self.files[a].resolve()
        path = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
        return f"{path}:{','.join(map(str, self.edges[a][b]))}"


def _module_name(path: Path, root: Path) -> str:
    """`root/x/y.py` -> `pkg.x.y`; `root/x/__init__.py` -> `pkg.x`."""
    parts = (root.name,) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING`: the branch never runs."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom at any depth (function bodies too), except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules) -> str | None:
    """The module a dotted name lands in: itself if it is a module, else the closest enclosing one
    (`pkg.x.func` -> `pkg.x`); None outside the package (third-party imports)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node, module: str, is_package: bool, modules):
    """The package's modules one import statement needs."""
    if isinstance(node, ast.Import):
        return [_resolve(alias.name, modules) for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: `from ..x import y` inside pkg.a.b -> pkg.x.y
        here = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
    # `from pkg.x import y` needs pkg.x.y when y is a submodule, else pkg.x (whose attribute y is).
    return [_resolve(base if alias.name == "*" else f"{base}.{alias.name}", modules) for alias in node.names]


def import_graph(root: Path) -> Graph:
    """The import graph of the package whose folder is `root` (e.g. `grpo_jax/`)."""
    root = Path(root)
    graph = Graph(root.name)
    for path in sorted(root.rglob("*.py")):
        graph.files[_module_name(path, root)] = path
    for module, path in graph.files.items():
        edges = graph.edges.setdefault(module, {})
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _import_nodes(tree):
            for target in _targets(node, module, path.name == "__init__.py", graph.files):
                if target is not None:
                    edges.setdefault(target, []).append(node.lineno)
        for target, lines in edges.items():
            edges[target] = sorted(set(lines))  # one line per statement, even for `from m import a, b`
    return graph


def _reachable(graph: Graph, start: str) -> set[str]:
    """Every module `start` imports, directly or through others (the package is small: no need for Tarjan)."""
    seen, stack = set(), [start]
    while stack:
        for w in graph.edges[stack.pop()]:
            if w not in seen:
                seen.add(w)
                stack.append(w)
    return seen


def _shortest_cycle(graph: Graph, start: str, members: set[str]) -> list[str]:
    """The shortest `start -> ... -> start` inside one component (breadth-first)."""
    parent, frontier = {}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.edges[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle")  # pragma: no cover - callers pass a module on a cycle


def find_cycles(graph: Graph) -> list[list[str]]:
    """Import cycles as `[a, b, ..., a]`: shortest ones, until every module on some cycle appears in one
    (so each strongly connected component, self-imports included, is reported in full)."""
    reach = {m: _reachable(graph, m) for m in sorted(graph.edges)}
    cycles, covered = [], set()
    for module in reach:  # a module is on a cycle iff it reaches itself; its component is what reaches back
        if module in reach[module] and module not in covered:
            cycles.append(_shortest_cycle(graph, module, {w for w in reach[module] if module in reach[w]}))
            covered.update(cycles[-1])
    return cycles


def loop_importers(graph: Graph, forbidden: str | None = None) -> list[str]:
    """Modules that import the training run (`<package>.loop` by default), which only the CLI may."""
    forbidden = forbidden or f"{graph.package}.loop"
    return sorted(m for m, targets in graph.edges.items() if m != forbidden and forbidden in targets)


def report(graph: Graph) -> list[str]:
    """Lines describing every violation; empty when the graph is clean."""
    lines = []
    for cycle in find_cycles(graph):
        lines.append("import cycle: " + " -> ".join(cycle))
        lines += [f"    {a} -> {b}    {graph.where(a, b)}" for a, b in zip(cycle, cycle[1:])]
    forbidden = f"{graph.package}.loop"
    for module in loop_importers(graph):
        lines.append(f"imports {forbidden} (only launch/ may): {module} -> {forbidden}    "
                     f"{graph.where(module, forbidden)}")
    return lines


def main(argv: list[str]) -> int:
    """Check the package folder in argv[0] (default: this repository's grpo_jax/); 1 on any violation."""
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[2] / "grpo_jax"
    graph = import_graph(root)
    problems = report(graph)
    print("\n".join(problems) if problems else
          f"{len(graph.files)} modules, {sum(map(len, graph.edges.values()))} import edges, no cycles")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
