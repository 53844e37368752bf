"""Imports inside the library run one way (spec <- paged / reference <- mla <- kinds <- runner <- front
ends): no cycle, not even one hidden in a function-level import."""
import ast
from pathlib import Path

import conformance

PACKAGE = Path(conformance.__file__).parent


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports relatively, anywhere in its body."""
    modules = {p.stem for p in package.glob("*.py")}
    graph = {}
    for name in modules:
        tree = ast.parse((package / f"{name}.py").read_text())
        graph[name] = {node.module.split(".")[0] for node in ast.walk(tree)
                       if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module} & modules
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as a path that returns to its start), or None."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        found = next((c for c in map(visit, sorted(graph[node])) if c), None)
        path.pop()
        done.add(node)
        return found

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_the_library_has_no_import_cycle():
    assert cycle(import_graph(PACKAGE)) is None


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    (tmp_path / "paged.py").write_text("from .spec import CaseSpec\n"
                                       "def make():\n    from .mla import make_mla  # hides the cycle\n")
    (tmp_path / "mla.py").write_text("from .paged import make\n")
    (tmp_path / "spec.py").write_text("")
    assert cycle(import_graph(tmp_path)) == ["mla", "paged", "mla"]
