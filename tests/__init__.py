"""The conformance tests, installed as `conformance.tests`: `pytest --pyargs conformance.tests` runs
the matrix wherever the suite is installed (docs/ci.md)."""
