"""What a run of one backend on one case ends with: the Result record, its Status, its Categories
and the Verdict a run hands over. The bottom of the house beside spec.py: every report, diff and
front end reads these, and nothing here knows how a case was run."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

from .spec import ONE_CALL, CaseSpec


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"  # wrong numbers, NaN/Inf, or a wrong cache write
    SKIP = "SKIP"  # the backend cannot run this case here; reason says why
    ERROR = "ERROR"  # the adapter raised, or returned the wrong shape, dtype or device
    CRASH = "CRASH"  # isolated runs: the worker process died
    TIMEOUT = "TIMEOUT"  # isolated runs: the worker hung


class Category(str, Enum):
    """What went wrong, for machines (a report, a nightly diff); the reason says it for people."""

    WRONG_OUTPUT = "wrong-output"  # finite, beyond the tolerance
    WRONG_LSE = "wrong-lse"
    NONFINITE = "non-finite"  # NaN or Inf in the output or LSE
    WRONG_CACHE_WRITE = "wrong-cache-write"  # a slot differs from the expected write, or poison was touched
    SHARED_BLOCK_WRITE = "shared-block-write"  # a write into a block that several sequences share (a prompt's)
    # Many calls (CaseSpec.calls), against the one call over the whole batch:
    PATH_MISMATCH = "path-mismatch"  # the tokens in chunks or one by one give other numbers
    BATCH_VARIANT = "batch-variant"  # a sequence's rows change with its neighbours
    NONDETERMINISTIC = "nondeterministic"  # the same call again gives other bits (where declared bit-exact)
    # Rollout vs rescore (a tiny LM through the backend):
    WRONG_LOGPROBS = "wrong-logprobs"  # the rollout's or the rescore's log-probs against the float64 model's
    ROLLOUT_RESCORE = "rollout-rescore"  # the rescore does not reproduce the rollout's log-probs
    TOKENS_DIVERGED = "tokens-diverged"  # a token the float64 model would not choose, and no near tie
    BAD_RETURN = "bad-return"  # not a tensor, or the wrong shape, dtype or device
    ADAPTER_RAISED = "adapter-raised"  # run(), write_cache() or a capability rule raised
    OUT_OF_MEMORY = "out-of-memory"  # the harness ran out of memory: the machine's limit
    NOT_STARTED = "not-started"  # isolated runs: the adapter could not reach a worker, or none started
    CRASH = "crash"
    TIMEOUT = "timeout"
    # An fp32 case failed as strict fp32, within TF32's noise: the kernel's matmuls ran at TF32 precision
    # (Triton's default tl.dot, cuBLAS with allow_tf32), undeclared (Capabilities.fp32_precision).
    FP32_AT_TF32 = "fp32-at-tf32"


@dataclass(frozen=True)
class Verdict:
    """A run's outcome: status, the human reason and the machine-readable categories."""

    status: Status
    reason: str = ""
    categories: tuple[Category, ...] = ()


def failed(category: Category, reason: str, status: Status = Status.ERROR) -> Verdict:
    return Verdict(status, reason, (category,))


@dataclass
class Result:
    """A plain record of one backend x case; reports are written from these alone."""

    backend: str
    case: str  # the case id, without the backend
    scenario: str
    dtype: str
    block_size: int
    heads: str
    device: str
    status: Status
    reason: str = ""
    categories: tuple[Category, ...] = ()  # what went wrong (empty for PASS and SKIP)
    kind: str = "mha"  # CaseSpec.kind: which test runs the pair (kinds.CaseKind.test)
    mode: str = ONE_CALL  # CaseSpec.calls: the call mode (modes/) the case ran in
    err: float | None = None  # max |out - ref|
    ref_err: float | None = None  # max |ref_lowp - ref|: the dtype's own noise on this case
    tol: float | None = None
    ratio: float | None = None  # err / tol, <= 1 passes
    lse_err: float | None = None
    lse_tol: float | None = None
    # Where the run's time went (costs.py: exclusive phases that add up to its wall time):
    backend_seconds: float | None = None  # the backend's calls ...
    compile_seconds: float | None = None  # ... of which torch.compile's and Triton's compiles
    harness_seconds: float | None = None  # inputs, references and judging: the rest but the wait
    inputs_seconds: float | None = None  # building the case and its fresh caches
    reference_seconds: float | None = None  # the float64 and low-precision references
    judge_seconds: float | None = None  # comparing, and the call mode's bookkeeping
    wait_seconds: float | None = None  # CUDA: waiting for GPU memory (memory.DeviceMemory)
    seed: int | None = None
    memory_estimate: int | None = None  # CUDA: bytes the pair was admitted with (modes.case_bytes)
    memory_peak: int | None = None  # CUDA: the most bytes this process had allocated during the run
    calls_ulp: int | None = None  # many calls: the largest difference from the one call's output (ulp_difference)
    deterministic: bool | None = None  # "invariance": the same call twice gave the same bits
    rescore_diff: float | None = None  # "rollout": max |rollout - rescore| of the generated tokens' log-probs
    known_failure: dict | None = None  # the backend's KnownFailure entry that matches this case (known.py)
    probe: str | None = None  # a probe (probe.py): the backend's declared refusal of this case, run anyway
    noise: str | None = None  # "tf32": tolerances calibrated to TF32's noise, as declared (Capabilities.fp32_precision)

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.case}"

    @property
    def seconds(self) -> float:
        """What the pair cost: the backend's and the harness's time."""
        return (self.backend_seconds or 0.0) + (self.harness_seconds or 0.0)

    @property
    def wall(self) -> float:
        """How long the pair took in its process: its cost and its wait for memory."""
        return self.seconds + (self.wait_seconds or 0.0)

    @classmethod
    def of(cls, identity: dict, verdict: Verdict, **measured) -> "Result":
        """The one way a Result is made: who ran what (identify()), how it ended, what was measured."""
        return cls(**identity, status=verdict.status, reason=verdict.reason, categories=verdict.categories,
                   **measured)

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        d = dict(d)
        if "calls" in d:  # reports written before the field was named for the call modes
            d["mode"] = d.pop("calls")
        return cls(**{**d, "status": Status(d["status"]),
                      "categories": tuple(Category(c) for c in d.get("categories", ()))})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        d["categories"] = [c.value for c in self.categories]
        return d


def identify(backend: str, spec: CaseSpec, device, base_seed: int) -> dict:
    """The fields of a Result that say which backend ran which case where (Result.of takes them)."""
    return dict(backend=backend, case=spec.id, scenario=spec.scenario, dtype=spec.dtype_name,
                block_size=spec.block_size, heads=spec.heads.id, device=str(device), seed=spec.seed(base_seed),
                kind=spec.kind, mode=spec.calls)
