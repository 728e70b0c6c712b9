"""The import graph of the lenscope package: edges, cycles, layers and module sizes.

Reads every module's source with :mod:`ast` (nothing is imported), counting
every ``import`` statement, at module level or inside a function, as an edge
between lenscope modules. An import of a package (``lenscope.datasets``) is
an edge to its ``__init__``; ``lenscope/__init__.py``'s lazy exports are
not edges (they are strings). Reports the strongly connected components
(import cycles) and each module's line count.

    python scripts/import_graph.py            # table of modules, then cycles
    python scripts/import_graph.py --dot      # Graphviz

The one documented exception (STYLE.md): a result's ``.plot()`` convenience
method imports the plotting module inside the method; such edges are listed
in :data:`ALLOWED` by ``(module, function)`` and left out of the cycle check.
"""

import argparse
import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lenscope"

ALLOWED: set[tuple[str, str]] = {
    ("lenscope.results", "plot"),
    ("lenscope.lens", "plot"),
    ("lenscope.attention", "plot"),
    ("lenscope.datasets.summary", "plot"),
    ("lenscope.tuned_lens", "plot"),
}
"""``(module, function)`` whose imports are the documented ``.plot()`` exception."""


def module_name(path: Path) -> str:
    """``lenscope/datasets/run.py`` -> ``lenscope.datasets.run``."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(tree: ast.AST) -> Iterator[tuple[str, str | None, int]]:
    """``(imported module, enclosing function or None, line)`` for every import."""

    def walk(node: ast.AST, function: str | None) -> Iterator[tuple[str, str | None, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from walk(child, child.name)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, function, child.lineno
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                yield child.module, function, child.lineno
                for alias in child.names:  # from lenscope import engine -> lenscope.engine
                    yield f"{child.module}.{alias.name}", function, child.lineno
            yield from walk(child, function)

    yield from walk(tree, None)


def edges(known: dict[str, Path]) -> list[tuple[str, str, str | None, int]]:
    """``(importer, imported, function, line)`` between lenscope modules."""
    out = []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        type_checking = {
            n.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
            if isinstance(n, ast.Import | ast.ImportFrom)
        }
        for target, function, line in _imports(tree):
            if line in type_checking or target not in known or target == name:
                continue
            out.append((name, target, function, line))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
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
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_cycles(*, allowed: bool = False) -> list[list[str]]:
    """The import cycles of the package (leaving out :data:`ALLOWED` edges unless ``allowed``)."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for importer, target, function, _ in edges(known):
        if not allowed and (importer, function) in ALLOWED:
            continue
        graph[importer].add(target)
        # Importing lenscope.x.y first runs lenscope.x's __init__.
        parent = target.rpartition(".")[0]
        if parent in known and parent != importer and not importer.startswith(parent + "."):
            graph[importer].add(parent)
    return cycles(graph)


ARCHITECTURE = ROOT.parent / "docs" / "architecture.md"


def _outside_parentheses(text: str) -> str:
    """``text`` without what stands in (possibly nested) parentheses."""
    depth, kept = 0, []
    for char in text:
        depth += char == "("
        if depth == 0:
            kept.append(char)
        depth -= char == ")" and depth > 0
    return "".join(kept)


def documented_layers(path: Path = ARCHITECTURE) -> dict[str, int]:
    """``{module: layer}`` as the numbered list under "## Layers" of docs/architecture.md has it.

    An item names its modules in backticks, outside parentheses (which hold
    what a module is for); a package item (`` `datasets/`: `facts`, ... `` or
    `` `plotting/` ``) names the package's modules, or, alone, all of them.
    """
    text = path.read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^(\d+)\. (.*?)(?=^\d+\. |^\S|\Z)", section, flags=re.M | re.S)
    known = modules()
    layers: dict[str, int] = {}
    for number, body in items:
        names = re.findall(r"`([\w/]+)`", _outside_parentheses(body))
        package = names[0][:-1] if names and names[0].endswith("/") else None
        if package is None:
            targets = [f"lenscope.{name}" for name in names]
        elif len(names) == 1:
            prefix = f"lenscope.{package}"
            targets = [m for m in known if m == prefix or m.startswith(prefix + ".")]
        else:
            targets = [f"lenscope.{package}"] + [f"lenscope.{package}.{n}" for n in names[1:]]
        for target in targets:
            layers[target] = int(number)
    return layers


def upward_imports(layers: dict[str, int]) -> list[tuple[str, str, int]]:
    """``(importer, imported, line)`` of every import of a later layer by an earlier one.

    The documented ``.plot()`` exception (:data:`ALLOWED`) is left out.
    """
    found = []
    for importer, target, function, line in edges(modules()):
        if (importer, function) in ALLOWED or importer not in layers or target not in layers:
            continue
        if layers[target] > layers[importer]:
            found.append((importer, target, line))
    return found


def main() -> int:
    """Print the module table and the cycles; exit 1 if a cycle remains."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print a Graphviz graph")
    args = parser.parse_args()
    known = modules()
    found = edges(known)
    if args.dot:
        print("digraph lenscope {")
        for importer, target, function, _ in found:
            style = ' [style=dashed, label="' + function + '"]' if function else ""
            print(f'  "{importer}" -> "{target}"{style};')
        print("}")
        return 0
    print(f"{'module':<32}{'lines':>6}  imports (function-level in parentheses)")
    for name, path in known.items():
        mine = sorted({t for i, t, f, _ in found if i == name and f is None})
        late = sorted({t for i, t, f, _ in found if i == name and f is not None})
        short = [t.removeprefix("lenscope.") for t in mine]
        short += [f"({t.removeprefix('lenscope.')})" for t in late]
        print(f"{name:<32}{len(path.read_text().splitlines()):>6}  {', '.join(short)}")
    remaining = import_cycles()
    with_plot = import_cycles(allowed=True)
    print(f"\nimport cycles: {len(remaining)} (with the .plot() methods counted: {len(with_plot)})")
    for component in with_plot:
        print("  " + " <-> ".join(component))
    return 1 if remaining else 0


if __name__ == "__main__":
    sys.exit(main())
