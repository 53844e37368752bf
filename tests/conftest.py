"""The self-tests (selftest/) belong to a checkout of the suite: `pytest` there runs them beside the
conformance tests. Anywhere else (`pytest --pyargs conformance.tests` in an engine's CI) the
installed suite is the conformance tests alone."""
from pathlib import Path

HERE = Path(__file__).parent


def pytest_ignore_collect(collection_path, config):
    if collection_path == HERE / "selftest" and config.rootpath != HERE.parent:
        return True
    return None
