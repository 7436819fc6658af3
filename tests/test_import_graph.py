"""The package's import graph has no circles, counting imports deferred into functions too.

A deferred import (inside a function) hides a circle from Python but not from a reader:
the two modules still cannot be understood apart. So every `import wake2vec.x` or
`from wake2vec import x` anywhere in a module is an edge, except under `if TYPE_CHECKING:`,
which the package does not use either (the test refuses it, so a circle cannot hide there).
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "wake2vec"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, modules: set[str], this: str) -> set[str]:
    found = set()
    package = this if this in {m for m in modules if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()} \
        else this.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            # `from pkg import sub` names the module pkg.sub, not pkg's __init__ (which Python runs anyway:
            # a package importing its own parts is no circle of design).
            names = [name for name in submodules if name in modules] or [base]
        else:
            continue
        for name in names:
            # `from wake2vec.x import y` (y a function) names wake2vec.x.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != this and not this.startswith(name + "."):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {}
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)), \
                f"{path}: imports under TYPE_CHECKING hide circles from this test"
        graph[_module_name(path)] = _imports(tree, modules, _module_name(path))
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (an import circle each)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_the_finder_sees_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_graph_covers_the_package_and_its_known_edges():
    graph = import_graph()
    assert "wake2vec.phases.runs" in graph and "wake2vec.analysis.metrics" in graph
    assert "wake2vec.training.checkpoint" in graph["wake2vec.phases.runs"]
    assert "wake2vec.models.lora_spec" in graph["wake2vec.models.model"]


def test_no_import_circles():
    circles = strongly_connected(import_graph())
    assert circles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_flat_names_of_moved_modules_import_the_same_module_with_a_warning():
    import importlib
    import sys
    import warnings

    import wake2vec

    sys.modules.pop("wake2vec.loop", None)  # an earlier test's import would skip the warning

    for old, new in wake2vec.MOVED.items():
        assert importlib.util.find_spec(new) is not None, new
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from wake2vec import loop as flat_loop  # the 0.1 spelling
    from wake2vec.training import loop
    assert flat_loop is loop and loop.__spec__.name == "wake2vec.training.loop"
    assert wake2vec.checkpoint is importlib.import_module("wake2vec.training.checkpoint")
    assert any(issubclass(w.category, DeprecationWarning) and "wake2vec.training.loop" in str(w.message)
               for w in caught)
