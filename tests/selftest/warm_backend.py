"""A backend with compile keys, for the warm-up self-test: each run appends its case id to the
file named by $WARM_LOG (from whichever process runs it)."""
import os
import time

from conformance import Backend, Case, register_backend, scatter_to_cache


@register_backend
class CompilingBackend(Backend):
    name = "compiling"

    def compile_key(self, spec):
        return (spec.dtype, spec.heads.head_dim)

    def run(self, case: Case):
        time.sleep(float(os.environ.get("WARM_SECONDS", "0")))  # a long build
        with open(os.environ["WARM_LOG"], "a") as f:
            f.write(f"{os.getpid()} {case.spec.id}\n")
        scatter_to_cache(case)
        case.out.zero_()
        return case.out
