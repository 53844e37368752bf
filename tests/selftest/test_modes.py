"""The call modes (conformance/modes/): one table, each mode checking its own cases, and no module
outside the modes branching on a mode's name (the same kind of rule as the import layers)."""
import ast
from pathlib import Path

import pytest
import torch

import conformance
from conformance import BatchSpec, CaseSpec, HeadConfig, SpecError
from conformance.modes import MODES, CallMode
from conformance.spec import CALL_MODES

ROOT = Path(conformance.__file__).resolve().parent.parent
MODES_DIR = ROOT / "conformance" / "modes"
# What names a case's call mode in an expression: spec.calls, result.mode, a variable `calls` or `mode`.
MODE_NAMES = {"calls", "mode"}


def _names_mode(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr in MODE_NAMES) or (
        isinstance(node, ast.Name) and node.id in MODE_NAMES)


def _strings(node) -> bool:
    """A string literal, or a tuple, list or set of them: what a branch on a name compares with."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_strings(e) for e in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _keyed_by_strings(node) -> bool:
    return isinstance(node, ast.Dict) and bool(node.keys) and all(k is not None and _strings(k) for k in node.keys)


def mode_branches(path: Path) -> list[str]:
    """Where `path` branches on a mode's name: compares it with a string (==, !=, in), looks it up in
    a dict literal keyed by strings, or matches it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(map(_names_mode, operands)) and any(map(_strings, operands)):
                found.append(node.lineno)
        elif isinstance(node, ast.Subscript) and _names_mode(node.slice) and _keyed_by_strings(node.value):
            found.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and _keyed_by_strings(node.func.value) and node.args and _names_mode(node.args[0])):
            found.append(node.lineno)
        elif isinstance(node, ast.Match) and _names_mode(node.subject):
            found.append(node.lineno)
    return [f"{path.name}:{line}" for line in sorted(found)]


def library_files() -> list[Path]:
    """The library, the adapters and the catalog, but the call modes themselves."""
    return [p for folder in ("conformance", "backends", "fixtures") for p in (ROOT / folder).rglob("*.py")
            if MODES_DIR not in p.parents]


def test_no_module_outside_the_modes_branches_on_a_mode_name():
    assert {str(p.relative_to(ROOT)): b for p in library_files() for b in [mode_branches(p)] if b} == {}


def test_each_way_of_branching_on_a_mode_name_is_found(tmp_path):
    path = tmp_path / "runner.py"
    path.write_text('if spec.calls == "graph":\n    pass\n'
                    'if "rollout" != r.mode:\n    pass\n'
                    'paths = calls in ("chunks", "tokens")\n'
                    'run = {"rollout": a, "graph": b}.get(spec.calls, c)\n'
                    'size = {"chunks": 1}[mode]\n'
                    'match spec.calls:\n    case "one":\n        pass\n'
                    'fine = spec.calls == ONE_CALL or spec.kind == "mla" or calls.upper()\n')
    assert mode_branches(path) == [f"runner.py:{n}" for n in (1, 3, 5, 6, 7, 8)]


def test_every_mode_is_in_the_table_under_its_name_and_checks_its_cases():
    assert set(MODES) == {"one", "chunks", "tokens", "invariance", "rollout", "graph"}
    for name, mode in MODES.items():
        assert isinstance(mode, CallMode) and mode.name == name and mode.description
        assert CALL_MODES[name] == mode.check  # a CaseSpec is checked by its mode when it is made


SPEC = CaseSpec("t", BatchSpec([12, 5], [4, 5]), HeadConfig(4, 2, 16), torch.float16, 8)


@pytest.mark.parametrize("changes, message", [
    (dict(calls="twice"), "CaseSpec.calls = 'twice': must be one of ('one', 'chunks', 'tokens', 'invariance', "
                          "'rollout', 'graph')"),
    (dict(calls="chunks", causal=False), "CaseSpec.calls = 'chunks': needs a causal case"),
    (dict(calls="rollout", softcap=4.0), "CaseSpec.calls = 'rollout': a rollout runs a dense model of causal"),
    (dict(calls="graph", batch=BatchSpec([9], [1])), "a graph case's batch needs 2 sequences or more"),
])
def test_a_case_its_mode_cannot_run_is_refused_when_it_is_made(changes, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SPEC.replace(**changes)
