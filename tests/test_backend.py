"""The conformance test: every registered backend on every case of the profile.

    pytest -k "flex and mixed_small"                      one backend, one scenario
    pytest --attn-backend sdpa --attn-profile cpu -n auto  the CPU profile of one backend, all cores
"""
from conformance.fixtures.pytest_plugin import check


def test_backend(conformance_case, conformance_runner):
    backend, spec = conformance_case
    check(conformance_runner.run(backend, spec))
