"""The suite beside what a user already has: PyPI packages named like the repository's folders,
the common pytest plugins (CI installs them all first), and an engine's CI that runs the installed
matrix from its own directory with an adapter from its own package's entry point."""
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import conformance.fixtures.pytest_plugin as plugin
from conformance.options import PYTEST_PREFIX

# The common plugins a user's environment may hold (pip name, pytest's plugin name).
COMMON_PLUGINS = {"pytest-json-report": "pytest_jsonreport", "pytest-html": "html", "pytest-timeout": "timeout",
                  "pytest-rerunfailures": "rerunfailures", "pytest-randomly": "randomly", "pytest-benchmark": "benchmark"}
# A pytest of its own: on the CPU (fast, the same everywhere), and no xdist worker's variables (its
# JSON report would take the worker's name).
CPU_ONLY = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}, "CUDA_VISIBLE_DEVICES": ""}


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_the_suite_installs_nothing_but_its_own_name():
    """`fixtures` and `backends` are other projects' names on PyPI: the suite's folders of those names
    import as conformance.fixtures and conformance.backends."""
    provided = {name for name, dists in importlib.metadata.packages_distributions().items()
                if "attention-conformance" in dists and not name.startswith("__editable__")}
    if not provided:
        pytest.skip("the suite is not pip-installed here (a checkout on PYTHONPATH): nothing to check")
    assert provided == {"conformance"}


@pytest.mark.skipif(not _installed("fixtures"), reason="PyPI's `fixtures` is not installed (pip install fixtures)")
@pytest.mark.skipif(not _installed("attention-conformance"), reason="the suite is not pip-installed here")
def test_pypi_fixtures_and_the_installed_suite_import_side_by_side(tmp_path):
    """Where the suite is installed (not in its checkout, whose folders are on sys.path there)."""
    code = ("import fixtures, conformance.fixtures, conformance.backends; assert hasattr(fixtures, 'Fixture'); "
            "assert conformance.fixtures.CATALOG.profiles and conformance.backends.sdpa; print(fixtures.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "site-packages" in out.stdout, out.stderr[-2000:]


def test_every_pytest_option_of_the_suite_has_its_prefix():
    flags = []
    plugin.pytest_addoption(type("Parser", (), {"getgroup": lambda self, name: type(
        "Group", (), {"addoption": lambda self, *names, **kw: flags.extend(names)})()})())
    assert flags and [f for f in flags if not f.startswith(PYTEST_PREFIX)] == []


@pytest.mark.parametrize("distribution", sorted(COMMON_PLUGINS))
def test_the_suite_runs_beside_a_common_plugin(distribution, pytestconfig):
    """This run started with the plugin loaded (a clashing option stops pytest at start-up), and no
    fixture of the suite's is one of the plugin's."""
    if not _installed(distribution):
        pytest.skip(f"{distribution} is not installed here (CI installs it)")
    name = COMMON_PLUGINS[distribution]
    loaded = pytestconfig.pluginmanager.get_plugin(name)
    if loaded is None:
        pytest.skip(f"{distribution} is installed but disabled in this run (-p no:{name})")
    theirs = {n for n in dir(loaded) if not n.startswith("_")}
    ours = {n for n, v in vars(plugin).items()  # pytest >= 8.4 wraps a fixture; earlier ones mark the function
            if type(v).__name__ == "FixtureFunctionDefinition" or hasattr(v, "_pytestfixturefunction")}
    assert ours and not ours & theirs


@pytest.mark.skipif(not _installed("pytest-randomly"), reason="pytest-randomly is not installed (CI installs it)")
def test_results_are_the_same_whatever_order_and_global_seed_pytest_randomly_picks(tmp_path):
    """pytest-randomly reorders the tests and reseeds random, numpy (and others) before each: a case
    is seeded by its id alone, so every number is the same."""
    def run(*randomly):
        path = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_backend.py",
                              "--attn-backend", "sdpa,triton", "--attn-profile", "quick", "-k", "mixed_small",
                              "--attn-json", str(path), *randomly], capture_output=True, text=True, env=CPU_ONLY)
        assert out.returncode == 0, out.stdout[-2000:]
        results = json.loads(path.read_text())["results"]  # in the order they ran
        return {r["backend"] + r["case"]: (r["status"], r["err"], r["lse_err"], r["seed"]) for r in results}

    plain, first, second = run("-p", "no:randomly"), run("--randomly-seed", "1"), run("--randomly-seed", "2")
    assert len(plain) > 10 and plain == first == second
    assert list(first) != list(second)  # it did reorder: the check is not vacuous


def test_the_installed_matrix_runs_outside_the_checkout_with_an_entry_point_adapter(tmp_path):
    """An engine's CI: its own package registers an adapter by entry point, and pytest runs the
    installed conformance tests from the engine's directory (no checkout of the suite there)."""
    (tmp_path / "engine_attention").mkdir()
    (tmp_path / "engine_attention" / "__init__.py").write_text(textwrap.dedent("""
        from conformance import register_backend
        from conformance.backends.sdpa import SdpaBackend

        register_backend(SdpaBackend("engine-sdpa", None))
    """))
    dist = tmp_path / "engine_attention-0.1.dist-info"  # what pip writes for `pip install` of the engine
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: engine-attention\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[attention_conformance.backends]\nengine-sdpa = engine_attention\n")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'engine'\n")  # the engine's rootdir, not ours
    env = {**CPU_ONLY, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}

    def pytest_(*args):  # -p: the plugin, where no install's entry point loads it (a checkout on PYTHONPATH)
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                               "conformance.fixtures.pytest_plugin", "--pyargs", "conformance.tests",
                               "--attn-profile", "quick", *args], cwd=tmp_path, capture_output=True, text=True, env=env)

    collected = pytest_("--collect-only").stdout
    assert "test_backend[engine-sdpa-small_decode" in collected, collected[-2000:]
    assert "selftest" not in collected  # outside a checkout the installed suite is the matrix alone
    out = pytest_("-k", "engine-sdpa and small_decode")
    passed = re.search(r"(\d+) passed", out.stdout)
    assert out.returncode == 0 and passed and int(passed[1]) > 0, out.stdout[-3000:] + out.stderr[-2000:]
