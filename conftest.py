# The suite's pytest options and fixtures live in fixtures/pytest_plugin.py (imported as conformance.fixtures.pytest_plugin).
pytest_plugins = ["conformance.fixtures.pytest_plugin"]
