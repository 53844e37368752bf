"""What the tests of adapters against stand-ins (fake_*.py) share: a GPU library's adapter let onto
the CPU, where the stand-in runs."""
import dataclasses

CPU = dict(devices=frozenset({"cpu"}), compute_capability=None)


def on_cpu(backend):
    """The adapter with its capabilities moved onto the CPU, else unchanged."""
    backend.capabilities = dataclasses.replace(backend.capabilities, **CPU)
    return backend
