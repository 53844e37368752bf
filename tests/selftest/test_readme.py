"""The README's adapter example must stay a working adapter; its commands are what CI runs; the
built-in backends are all documented (docs/backends.md)."""
import pathlib
import re
import types

import pytest

import conformance.registry as registry
from conformance import Runner, Status
from conformance.fixtures import CATALOG

README = pathlib.Path(__file__).parents[2] / "README.md"
BACKENDS_DOC = README.parent / "docs" / "backends.md"


def test_readme_example_adapter_runs_and_passes(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    code = re.search(r"<!-- example-adapter -->\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    module = types.ModuleType("readme_example")
    exec(compile(code, str(README), "exec"), module.__dict__)
    backend = registry._REGISTRY["naive-torch"]
    runner = Runner("cpu")
    results = [runner.run(backend, spec) for spec in CATALOG.cases("cpu", ["mixed_small", "encoder_prefill"], kind="mha")]
    statuses = {r.status for r in results}
    assert statuses == {Status.PASS, Status.SKIP}, [r.reason for r in results if r.status not in statuses]
    assert {r.reason for r in results if r.status == Status.SKIP} == {
        "feature sliding_window not supported", "feature softcap not supported", "feature sinks not supported",
        "kv dtype fp8_e4m3 not supported (supports: auto)", "kv layout hnd not supported (supports: nhd)",
        "kv layout combined_nhd not supported (supports: nhd)", "kv layout combined_hnd not supported (supports: nhd)"}


@pytest.mark.parametrize("command", [
    'pip install torch==2.13.0 && pip install -e ".[triton,plots]" && python -m conformance run',  # set-up, main job
    "python -m pytest -n auto",  # the tests
])
def test_readme_commands_are_what_ci_runs(command):
    """CI runs the README's two commands verbatim, in a virtualenv of its own."""
    ci = (README.parent / ".ci" / "run").read_text()
    assert f"    {command}\n" in README.read_text() and f"\n{command}\n" in ci
    assert "python -m venv" in ci


BUILTIN = sorted(name for name, b in registry.load_backends().items() if type(b).__module__.startswith("conformance.backends."))


@pytest.mark.parametrize("name", BUILTIN)
def test_backends_doc_lists_every_builtin_backend(name):
    assert f"`{name}`" in BACKENDS_DOC.read_text()
