"""The MLA conformance test: every registered MLA backend on every MLA case of the profile.

    pytest -k mla                                 all of them
    pytest -k "mla-triton and spec_decode"        one backend, one scenario
"""
from conformance.fixtures.pytest_plugin import check


def test_mla_backend(mla_case, conformance_runner):
    backend, spec = mla_case
    check(conformance_runner.run(backend, spec))
