# The suite's pytest options and fixtures live in fixtures/pytest_plugin.py.
pytest_plugins = ["fixtures.pytest_plugin"]
