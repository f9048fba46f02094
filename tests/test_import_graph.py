"""The import graph of `cirlab` against docs/architecture.md: no cycle between modules, no import from a
lower layer to a higher one, every module in a layer. Read from the source (imports inside functions
included), so a loop hidden in a function body is found before it bites at run time."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cirlab"
DOC = ROOT / "docs" / "architecture.md"


def read_layers(doc: Path = DOC) -> list[tuple[str, list[str]]]:
    """`1. **name**: `cirlab.x`, `cirlab.y`` lines of the doc, lowest layer first."""
    layers = [
        (name, re.findall(r"`([\w.]+)`", names))
        for name, names in re.findall(r"^\d+\. \*\*(.+?)\*\*: (.+)$", doc.read_text(), re.M)
    ]
    if not layers:
        raise ValueError(f"{doc}: no layer list ('1. **name**: `module`, ...')")
    return layers


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package by its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(dotted name, line) of every import anywhere in the tree but under `if TYPE_CHECKING:`;
    `from a import b` gives `a.b`, a module or a name in module `a` (the caller tells which)."""
    out: list[tuple[str, int]] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
        stack.extend(ast.iter_child_nodes(node))
    return out


def import_graph(files: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line}, between modules of the package only."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges = graph.setdefault(module, {})
        names = imported(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        for name, line in sorted(names, key=lambda n: n[1]):
            if name.split(".")[0] != "cirlab":
                continue
            while name not in files:  # `cirlab.x.name` -> cirlab.x
                name = name.rpartition(".")[0]
            if name != module:
                edges.setdefault(name, line)
    return graph


def layer_of(module: str, layers: list[tuple[str, list[str]]]) -> int | None:
    """The layer of the most specific name that is `module` or a package above it (the root package
    `cirlab` names only its __init__)."""
    best: tuple[int, int] | None = None
    for rank, (_, names) in enumerate(layers):
        for name in names:
            if module == name or ("." in name and module.startswith(name + ".")):
                if best is None or len(name) > best[0]:
                    best = (len(name), rank)
    return None if best is None else best[1]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One loop per strongly connected group of modules (Tarjan), as the modules round it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_loop(graph, set(group), min(group)) for group in groups]


def _loop(graph: dict[str, dict[str, int]], group: set[str], start: str) -> list[str]:
    """A path start -> ... -> start inside the group (breadth first: the shortest)."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                return paths[v] + [start]
            if w in group and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no loop through {start}")


def where(files: dict[str, Path], graph, a: str, b: str) -> str:
    return f"{files[a].relative_to(ROOT)}:{graph[a][b]}"


def test_no_import_cycle():
    files = module_files()
    graph = import_graph(files)
    found = [
        " -> ".join(loop) + "\n    " + ", ".join(where(files, graph, a, b) for a, b in zip(loop, loop[1:]))
        for loop in cycles(graph)
    ]
    assert not found, "import cycles (module -> module, then where each import is):\n  " + "\n  ".join(found)


def test_every_module_in_a_layer():
    layers = read_layers()
    missing = [m for m in module_files() if layer_of(m, layers) is None]
    assert not missing, f"modules in no layer of {DOC.relative_to(ROOT)} (add them to its list): {missing}"


def test_no_upward_import():
    layers = read_layers()
    files = module_files()
    graph = import_graph(files)
    upward = []
    for a, edges in graph.items():
        for b in edges:
            la, lb = layer_of(a, layers), layer_of(b, layers)
            if la is not None and lb is not None and la < lb:
                upward.append(
                    f"{a} ({layers[la][0]}) imports {b} ({layers[lb][0]}) at {where(files, graph, a, b)}"
                )
    assert not upward, (
        f"imports from a lower layer to a higher one ({DOC.relative_to(ROOT)}):\n  " + "\n  ".join(upward)
    )


def test_the_graph_sees_function_level_imports(tmp_path):
    """The checks above would pass vacuously if the reader missed imports: a loop made only of
    imports inside functions and an upward import are found."""
    pkg = tmp_path / "cirlab"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from cirlab.cli import main\n")
    (pkg / "cli.py").write_text("def main():\n    from cirlab.data import a\n")
    (pkg / "typed.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cirlab.cli\n"
    )
    files = module_files(pkg)
    graph = import_graph(files)
    assert cycles(graph) == [["cirlab.cli", "cirlab.data.a", "cirlab.cli"]]
    assert graph["cirlab.typed"] == {}
    layers = [("data", ["cirlab.data"]), ("entry", ["cirlab.cli"])]
    assert layer_of("cirlab.data.a", layers) == 0 and layer_of("cirlab.cli", layers) == 1
    assert layer_of("cirlab", layers) is None
