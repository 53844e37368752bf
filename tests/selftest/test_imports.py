"""Imports inside the library run one way (spec <- paged / reference <- mla <- kinds <- runner <- config
<- front ends): no cycle, not even one hidden in a function-level import; and the library below the
front ends receives the catalog and the adapters instead of importing `conformance.fixtures` or
`conformance.backends`."""
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


FRONT_ENDS = {"cli", "config", "__main__"}  # they pick the suite's own catalog and built-in adapters


def absolute_imports(path: Path) -> set[str]:
    """The catalog or adapter packages (`conformance.fixtures`, `conformance.backends`) `path`
    imports, by absolute or relative name, anywhere in its body."""
    tree = ast.parse(path.read_text())
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "conformance." * bool(node.level) + (node.module or "")
            names |= {base} | {f"{base}.{a.name}".replace("..", ".") for a in node.names}
    names |= {node.args[0].value for node in ast.walk(tree)  # importlib.import_module("conformance.backends")
              if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)}
    return {".".join(n.split(".")[:2]) for n in names} & {"conformance.fixtures", "conformance.backends"}


def test_the_library_imports_neither_the_catalog_nor_the_adapters():
    reaching = {p.stem: sorted(absolute_imports(p)) for p in PACKAGE.glob("*.py") if p.stem not in FRONT_ENDS}
    assert {m: found for m, found in reaching.items() if found} == {}


def test_an_import_of_the_catalog_is_found(tmp_path):
    (tmp_path / "matrix.py").write_text("def catalog():\n    from conformance.fixtures import SCENARIOS\n")
    (tmp_path / "registry.py").write_text("import importlib\nimportlib.import_module('conformance.backends')\n")
    (tmp_path / "spec.py").write_text("from . import backends\nfrom .fixtures.heads import HEAD_CONFIGS\n")
    assert absolute_imports(tmp_path / "matrix.py") == {"conformance.fixtures"}
    assert absolute_imports(tmp_path / "registry.py") == {"conformance.backends"}
    assert absolute_imports(tmp_path / "spec.py") == {"conformance.backends", "conformance.fixtures"}
