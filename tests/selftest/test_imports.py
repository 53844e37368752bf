"""Imports inside the library run one way, up the layers docs/architecture.md draws (values <- cases
<- call modes <- runners | reports <- front ends): no cycle, not even one hidden in a function-level
import, and no arrow from a layer to one above it or to a sibling; and the library below the front
ends receives the catalog and the adapters instead of importing `conformance.fixtures` or
`conformance.backends`."""
import ast
from pathlib import Path

import conformance

PACKAGE = Path(conformance.__file__).parent


def module_name(package: Path, path: Path) -> str:
    """`path`'s module in the package, dotted: "runner", "modes.graph", "modes" (its __init__)."""
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports relatively, anywhere in its body (subpackages
    included: `from ..judge import x` in modes/graph.py is an arrow to "judge")."""
    paths = {module_name(package, p): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        here = name.split(".")[:-1] if path.name != "__init__.py" else [] if name == "__init__" else name.split(".")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = here[:len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            for target in [base + [a.name] for a in node.names] + [base]:  # `from . import modes` names a module
                dotted = ".".join(target)
                if dotted in paths and dotted != name:
                    found.add(dotted)
                    break
        graph[name] = found
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


# The layers, lowest first, as (rank, modules; "x.*" every module of subpackage x). A module imports
# from lower ranks and from its own layer only: runners and reports share a rank and know nothing
# of each other (a report reads Results; it never runs anything).
LAYERS = {
    "values": (0, {"spec", "result", "costs", "tolerance", "known", "managers", "manager_checks", "triton_rules"}),
    "cases": (1, {"paged", "reference", "mla", "kinds", "calls", "memory", "prepared", "registry", "probe", "judge",
                  "matrix", "rollout", "rollout.*"}),
    "call modes": (2, {"modes", "modes.*"}),
    "runners": (3, {"runner", "isolation", "warmup", "bench"}),
    "reports": (3, {"report", "diff", "html", "shard", "options"}),
    "front ends": (4, {"config", "cli", "__main__", "__init__"}),
}


def layer_of(module: str) -> str | None:
    return next((layer for layer, (_, members) in LAYERS.items()
                 if module in members or f"{module.split('.')[0]}.*" in members and "." in module), None)


def arrows_up(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a module to one of a higher layer or of a sibling layer, and every module
    placed in no layer."""
    bad = [f"{m}: in no layer" for m in sorted(graph) if layer_of(m) is None]
    for m in sorted(graph):
        for target in sorted(graph[m]):
            here, there = layer_of(m), layer_of(target)
            if here and there and here != there and LAYERS[there][0] >= LAYERS[here][0]:
                bad.append(f"{m} ({here}) imports {target} ({there})")
    return bad


def test_imports_go_down_the_layers():
    assert arrows_up(import_graph(PACKAGE)) == []


def test_an_import_up_or_across_the_layers_is_found(tmp_path):
    (tmp_path / "modes").mkdir()
    (tmp_path / "modes" / "__init__.py").write_text("from ..runner import Runner\n")
    (tmp_path / "runner.py").write_text("from .report import failing\n")
    (tmp_path / "report.py").write_text("")
    (tmp_path / "mystery.py").write_text("")
    assert arrows_up(import_graph(tmp_path)) == ["mystery: in no layer", "modes (call modes) imports runner (runners)",
                                                 "runner (runners) imports report (reports)"]


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
    reaching = {module_name(PACKAGE, p): sorted(absolute_imports(p)) for p in PACKAGE.rglob("*.py")
                if module_name(PACKAGE, p) not in FRONT_ENDS}
    assert {m: found for m, found in reaching.items() if found} == {}


def test_an_import_of_the_catalog_is_found(tmp_path):
    (tmp_path / "matrix.py").write_text("def catalog():\n    from conformance.fixtures import SCENARIOS\n")
    (tmp_path / "registry.py").write_text("import importlib\nimportlib.import_module('conformance.backends')\n")
    (tmp_path / "spec.py").write_text("from . import backends\nfrom .fixtures.heads import HEAD_CONFIGS\n")
    assert absolute_imports(tmp_path / "matrix.py") == {"conformance.fixtures"}
    assert absolute_imports(tmp_path / "registry.py") == {"conformance.backends"}
    assert absolute_imports(tmp_path / "spec.py") == {"conformance.backends", "conformance.fixtures"}
