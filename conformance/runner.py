"""Run one backend on one case and judge it: the only place where a Result is made."""
from __future__ import annotations

import dataclasses
import functools
import math
import time
import traceback
from collections import OrderedDict
from dataclasses import asdict, dataclass
from enum import Enum

import torch

from .calls import call_spec, path, sub_case, token_rows, variants
from .graphs import Captured, load, replays
from .kinds import kind_of, make_inputs, reference_attention
from .known import known_failure
from .probe import declared
from .managers import RefCountedBlocks
from .memory import SMALL_CASE, DeviceMemory, case_bytes, shrink_local_memory, too_big
from .paged import Pages, PagedBatch, bits
from .reference import Reference
from .registry import Backend, Unsupported
from .rollout import AMPLIFICATION, Generated, Rollout, Scores, check_manager, roll_out, score
from .spec import CaseSpec
from .tolerance import DEFAULT_TOLERANCE, Comparison, compare, ulp_difference


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"  # wrong numbers, NaN/Inf, or a wrong cache write
    SKIP = "SKIP"  # the backend cannot run this case here; reason says why
    ERROR = "ERROR"  # the adapter raised, or returned the wrong shape, dtype or device
    CRASH = "CRASH"  # reserved for isolated runs: the worker process died
    TIMEOUT = "TIMEOUT"  # reserved for isolated runs: the worker hung


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
    err: float | None = None  # max |out - ref|
    ref_err: float | None = None  # max |ref_lowp - ref|: the dtype's own noise on this case
    tol: float | None = None
    ratio: float | None = None  # err / tol, <= 1 passes
    lse_err: float | None = None
    lse_tol: float | None = None
    backend_seconds: float | None = None
    harness_seconds: float | None = None  # inputs, references and judging; the backend excluded
    seed: int | None = None
    memory_estimate: int | None = None  # CUDA: bytes the case was admitted with (memory.case_bytes)
    memory_peak: int | None = None  # CUDA: the most bytes this process had allocated during the run
    calls: str = "one"  # CaseSpec.calls
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

    @classmethod
    def of(cls, identity: dict, verdict: Verdict, **measured) -> "Result":
        """The one way a Result is made: who ran what (identify()), how it ended, what was measured."""
        return cls(**identity, status=verdict.status, reason=verdict.reason, categories=verdict.categories,
                   **measured)

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        return cls(**{**d, "status": Status(d["status"]),
                      "categories": tuple(Category(c) for c in d.get("categories", ()))})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        d["categories"] = [c.value for c in self.categories]
        return d


def finish(result: Result, backend: Backend, spec: CaseSpec, device: torch.device) -> Result:
    """`result` with what the backend declares of the case: the refusal a probe overrides and the
    matching known failure. Every runner's results go through it, whoever made them (a crash or a
    timeout that IsolatedRunner makes itself too), so a listed failure is an XFAIL either way.
    Idempotent: it only reads the backend's declarations."""
    return dataclasses.replace(result, probe=declared(backend, spec, device),
                               known_failure=known_failure(backend, spec.id, device))


class _Prepared:
    """A case's inputs and both references, shared by every backend run on the same case. The
    references are computed when first judged against (a graph case's captured batch never is)."""

    def __init__(self, inputs: Pages):
        self.inputs = inputs  # Inputs, or MLAInputs for an MLA case

    @functools.cached_property
    def ref(self) -> Reference:
        return reference_attention(self.inputs, "float64")

    @functools.cached_property
    def ref_lowp(self) -> Reference:
        return reference_attention(self.inputs, "lowp")

    @functools.cached_property
    def ref_tf32(self) -> Reference:  # an fp32 case computed as by TF32 matmuls (reference.to_tf32)
        return reference_attention(self.inputs, "tf32")


class Runner:
    """Runs cases on one device. Keeps the last few prepared cases, so running several backends
    on the same case in a row computes its references once; a big case (more than SMALL_CASE
    bytes) is kept alone. On CUDA, every case is admitted into the GPU's memory ledger first
    (memory.DeviceMemory), so processes sharing the GPU wait for room instead of running out."""

    def __init__(self, device: str | torch.device = "cpu", base_seed: int = 0, keep: int = 2,
                 finite_poison: bool = False, manager: type = RefCountedBlocks):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # libraries that launch on the current GPU (Triton) follow the case's
        self.base_seed = base_seed
        # Poison unused cache slots with a large finite value for every backend, not NaN: then only
        # reads that change the output fail (a backend's own finite_poison says the same for itself).
        self.finite_poison = finite_poison
        self.manager = manager  # what hands out the blocks of rollouts: a class of a protocol of managers.py
        self.results: list[Result] = []  # every result of this runner, in order (reports are written from it)
        self._keep = keep
        self._prepared: OrderedDict[tuple, _Prepared] = OrderedDict()
        self.memory = DeviceMemory.of(self.device) if self.device.type == "cuda" else None
        self.on_waiting = lambda: None  # called when a case starts to wait for GPU memory ...
        self.on_admitted = lambda: None  # ... and when it got it

    def prepared(self, spec: CaseSpec) -> _Prepared:
        key = (spec, self.base_seed)
        if key not in self._prepared:
            self._make_room(spec)
            self._prepared[key] = _Prepared(make_inputs(spec, self.device, spec.seed(self.base_seed)))
        self._prepared.move_to_end(key)
        return self._prepared[key]

    def _make_room(self, spec: CaseSpec) -> None:
        """Drop the prepared cases `spec` will not keep company with: all of them beside a big case
        (it is kept alone), else the oldest past `keep`."""
        if (spec, self.base_seed) in self._prepared or not self._prepared:
            return
        if max(case_bytes(spec), *(case_bytes(k[0]) for k in self._prepared)) > SMALL_CASE:
            self._prepared.clear()
            self._give_back()
        elif len(self._prepared) >= self._keep:
            self._prepared.popitem(last=False)

    def run(self, backend: Backend, spec: CaseSpec) -> Result:
        result = finish(self._run(backend, spec), backend, spec, self.device)
        self.results.append(result)
        return result

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        pass  # nothing to release; IsolatedRunner stops its worker here

    def _run(self, backend: Backend, spec: CaseSpec) -> Result:
        who = identify(backend.name, spec, self.device, self.base_seed)
        refused = refusal(backend, spec, self.device)
        if refused:
            return Result.of(who, refused)
        measured = {}
        if self.memory:
            self._make_room(spec)  # a process waiting for memory holds no case it will not run again
            self.memory.settle(torch.cuda.memory_allocated(self.device))
            measured["memory_estimate"] = case_bytes(spec)
            if self.memory.admit(measured["memory_estimate"], self.on_waiting):  # waits for room on the GPU
                self.on_admitted()
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()  # the harness's time starts once the case has its memory
        try:
            run = {"rollout": self._roll_out, "graph": self._replay}.get(spec.calls, self._run_case)
            verdict = run(backend, spec, measured, t0)
        except torch.OutOfMemoryError as e:  # the machine's limit, not the backend's fault: say so, go on
            self._prepared.clear()  # (the backend's own OOM is its ERROR)
            verdict = _out_of_memory(e)
        if self.memory:
            measured["memory_peak"] = torch.cuda.max_memory_allocated(self.device)
        self._release()  # the case's cache is gone with _run_case's frame: the memory can go back
        return Result.of(who, verdict, **measured)

    def _run_case(self, backend: Backend, spec: CaseSpec, measured: dict, t0: float) -> Verdict:
        """Run the backend on the case (in its calls) and judge it; its times and the judged numbers
        go into `measured`."""
        prep = self.prepared(spec)
        fresh = lambda: prep.inputs.materialize(finite_poison=backend.finite_poison or self.finite_poison)  # noqa: E731
        case = fresh()

        def calls():  # (out, lse, other calls' outputs that must match them, what was not compared and why)
            if spec.calls in ("chunks", "tokens"):
                out, lse = self._path(backend, case)
                return (out, lse, *self._one_call(backend, case, out, fresh))
            out, lse = self._call(backend, case)
            return (out, lse, *(self._other_batches(backend, case, out) if spec.calls == "invariance" else ([], [])))

        returned, refused = self._timed(calls, measured)
        if refused:
            return refused
        out, lse, twins, notes = returned
        verdict = _judge(backend, case, prep, out, lse, measured, twins, notes)
        measured["harness_seconds"] = time.perf_counter() - t0 - measured["backend_seconds"]
        return verdict

    def _roll_out(self, backend: Backend, spec: CaseSpec, measured: dict, t0: float) -> Verdict:
        """The tiny LM's rollout and rescore through the backend, judged against the float64 model."""
        check_manager(self.manager, spec)  # a manager that cannot run this rollout is the caller's error
        got, refused = self._timed(lambda: roll_out(backend, spec, self.device, spec.seed(self.base_seed), self._call,
                                                    self.manager), measured)
        if refused:
            return refused
        verdict = _judge_rollout(backend, spec, got, score(got), measured)
        measured["harness_seconds"] = time.perf_counter() - t0 - measured["backend_seconds"]
        return verdict

    def _replay(self, backend: Backend, spec: CaseSpec, measured: dict, t0: float) -> Verdict:
        """The call captured on the case's batch, replayed on other batches of its shape (graphs.py);
        each replay judged against its own batch's truth before the next one overwrites it, the
        worst one's numbers in `measured`."""
        poison = backend.finite_poison or self.finite_poison
        static = self.prepared(spec).inputs.materialize(finite_poison=poison)
        preps = {name: self._replay_prepared(spec.replace(batch=batch, calls="one"), static)
                 for name, batch in replays(spec.batch).items()}

        def capture():
            backend.write_cache(static)
            return Captured(backend, static)

        def replay(case):
            backend.write_cache(case)
            returned = graph.replay()
            self._sync()
            return _unpack(returned, static, backend)

        timed = {}
        graph, refused = self._timed(capture, timed)
        if refused:
            return refused
        seconds, problems, worst = timed["backend_seconds"], [], {}
        for name, prep in preps.items():
            case = load(static, prep.inputs.materialize(finite_poison=poison))
            returned, refused = self._timed(lambda: replay(case), timed)  # noqa: B023 - called at once
            if refused:
                return refused
            seconds += timed["backend_seconds"]
            rows = slice(0, case.out.shape[0])  # past them: padding rows
            out, lse = returned[0][rows], None if returned[1] is None else returned[1][rows]
            numbers = {}
            problems += [(category, f"replay on the {name} batch: {text}")
                         for category, text in _problems(backend, case, prep, out, lse, numbers)]
            if numbers["ratio"] >= worst.get("ratio", -1):
                worst = numbers
        measured.update(worst, backend_seconds=seconds)
        measured["harness_seconds"] = time.perf_counter() - t0 - seconds
        how = "captured in a CUDA graph" if self.device.type == "cuda" else "no CUDA graph on a CPU: the prepared call"
        return _verdict(problems, [f"{how}, replayed on the {' and '.join(preps)} batches"])

    def _replay_prepared(self, spec: CaseSpec, static: PagedBatch) -> _Prepared:
        """A replay's inputs and references, its fp8 cache with the captured batch's scales (an
        engine's stay fixed; the captured call holds them)."""
        prep = self.prepared(spec)
        scales = {f.name: getattr(static, f.name) for f in dataclasses.fields(prep.inputs) if f.name.endswith("_scale")}
        if all(getattr(prep.inputs, name) == value for name, value in scales.items()):
            return prep
        return _Prepared(dataclasses.replace(prep.inputs, **scales))

    def _timed(self, calls, measured: dict):
        """(what calls() returned, None), or (None, the verdict its exception means); the time the
        calls took goes into `measured`."""
        self._sync()
        t = time.perf_counter()
        try:
            returned = calls()
        except Unsupported as e:
            return None, Verdict(Status.SKIP, f"refused at call time: {e}")
        except _BadOutput as e:
            return None, failed(Category.BAD_RETURN, str(e))
        except Exception as e:  # noqa: BLE001 - an adapter's exception is its result, not the run's end
            return None, failed(Category.ADAPTER_RAISED, _error(e))
        measured["backend_seconds"] = time.perf_counter() - t
        return returned, None

    def _call(self, backend: Backend, case: PagedBatch):
        """One call: the cache write and the attention, and what it returned, checked: (out, lse)."""
        backend.write_cache(case)
        returned = backend.run(case)
        self._sync()
        return _unpack(returned, case, backend)

    def _path(self, backend: Backend, case: PagedBatch):
        """The new tokens in chunks or one by one, each call over the same cache; the calls' rows
        put together as one call over the whole batch would return them."""
        out, lse = case.out, None
        for picks in path(case.spec.batch, case.spec.calls):
            part, part_lse = self._call(backend, sub_case(case, picks))
            rows = token_rows(case, picks)
            out[rows] = part
            if part_lse is not None:
                if lse is None:
                    lse = torch.full(out.shape[:2], math.nan, dtype=torch.float32, device=out.device)
                lse[rows] = part_lse.float()
        return out, lse

    def _one_call(self, backend: Backend, case: PagedBatch, out: torch.Tensor, fresh):
        """The same tokens in one call over the whole batch, on a fresh cache: the twin of a path."""
        one = case.spec.replace(calls="one")
        why = backend.skip_reason(one, self.device)
        if why:
            return [], [f"not compared with one call over the whole batch, which {backend.name} does not take: {why}"]
        twin = dataclasses.replace(fresh(), spec=one)
        got, _ = self._call(backend, twin)
        return [_Twin(f"{case.spec.calls} against one call", case.spec.calls, out, got)], []

    def _other_batches(self, backend: Backend, case: PagedBatch, out: torch.Tensor):
        """Each sequence in other batches over the same cache (their writes are the same as the
        first call's), and the same call again: their rows against the first call's."""
        twins, notes = [], []
        for name, picks in variants(case.spec.batch).items():
            why = backend.skip_reason(call_spec(case.spec, picks), self.device)
            if why:
                notes.append(f"{name} batch not run: {why}")
                continue
            got, _ = self._call(backend, sub_case(case, picks))
            twins.append(_Twin(f"{name} batch", "batch", got, out[token_rows(case, picks)]))
        again, _ = self._call(backend, dataclasses.replace(case, out=torch.full_like(case.out, math.nan)))
        twins.append(_Twin("the same call again", "run_to_run", again, out))
        return twins, notes

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _release(self) -> None:
        """After a case: the memory it no longer needs, and the claim on it, back to the GPU."""
        self._give_back()
        if self.memory:
            shrink_local_memory()
            self.memory.settle(torch.cuda.memory_allocated(self.device))  # what stays prepared

    def _give_back(self) -> None:
        """Other processes on the GPU may be waiting for the memory of a big case, which a caching
        allocator would keep reserved."""
        if self.memory and torch.cuda.memory_reserved(self.device) > SMALL_CASE:
            torch.cuda.empty_cache()


def identify(backend: str, spec: CaseSpec, device: torch.device, base_seed: int) -> dict:
    """The fields of a Result that say which backend ran which case where (Result.of takes them)."""
    return dict(backend=backend, case=spec.id, scenario=spec.scenario, dtype=spec.dtype_name,
                block_size=spec.block_size, heads=spec.heads.id, device=str(device), seed=spec.seed(base_seed),
                calls=spec.calls)


def refusal(backend: Backend, spec: CaseSpec, device: torch.device) -> Verdict | None:
    """A SKIP (the backend cannot run the case here, with every reason) or an ERROR (its rules
    raised), decided without running anything; None when the case is to run."""
    try:
        reason = refused_call(backend, spec, device) or too_big(spec, device)
    except Exception as e:  # noqa: BLE001 - a broken capability rule is the adapter's error, not the run's end
        return failed(Category.ADAPTER_RAISED, f"{backend.name}.skip_reason raised {_error(e)}")
    return Verdict(Status.SKIP, reason) if reason else None


def refused_call(backend: Backend, spec: CaseSpec, device: torch.device) -> str | None:
    """Why the backend does not take a call the case must make: the one call over the whole batch,
    one of the calls of a path (which a decode-only kernel takes, token by token) or of a rollout,
    or a batch a graph meets."""
    if spec.calls == "graph":  # each batch the graph meets, as it reaches the backend (padding included)
        calls = [("the captured batch", spec)] + [(f"the {name} replay", spec.replace(batch=batch))
                                                  for name, batch in replays(spec.batch).items()]
    elif spec.calls == "rollout":
        calls = Rollout.of(spec.batch).calls(spec)
    elif spec.calls in ("chunks", "tokens"):
        steps = path(spec.batch, spec.calls)
        calls = ((f"call {i + 1} of {len(steps)} ({spec.calls})", call_spec(spec, picks))
                 for i, picks in enumerate(steps))
    else:
        return backend.skip_reason(spec.replace(calls="one"), device)
    for which, call in calls:
        why = backend.skip_reason(call, device)
        if why:
            return f"{which}: {why}"
    return None


def _out_of_memory(e: Exception) -> Verdict:
    return failed(Category.OUT_OF_MEMORY, f"the case does not fit in memory here: {_error(e)}")


@dataclass
class _Twin:
    """Another call's output for the same rows as the judged one, which must match it."""

    what: str  # for the reason: "padded batch", "tokens against one call" ...
    claim: str  # the BIT_EXACT name a backend declares to promise the same bits
    got: torch.Tensor
    want: torch.Tensor


_TWIN_CATEGORIES = {"chunks": Category.PATH_MISMATCH, "tokens": Category.PATH_MISMATCH,
                    "batch": Category.BATCH_VARIANT, "run_to_run": Category.NONDETERMINISTIC}


def _judge(backend: Backend, case, prep: _Prepared, out, lse, measured: dict, twins=(), notes=()) -> Verdict:
    """Output, LSE and cache against the references, and the other calls against the judged one;
    the numbers go into `measured`."""
    problems = _problems(backend, case, prep, out, lse, measured)
    problems += _twins_differ(backend, twins, measured["tol"], measured)
    return _verdict(problems, notes)


def _problems(backend: Backend, case, prep: _Prepared, out, lse, measured: dict) -> list[tuple[Category, str]]:
    """What is wrong with one call's output, LSE and cache against the references; the numbers go
    into `measured`."""
    tolerance, dtype = backend.tolerance or DEFAULT_TOLERANCE, case.spec.dtype
    fp32 = dtype == torch.float32
    tf32 = fp32 and backend.capabilities.fp32_precision == "tf32"
    noise = prep.ref_tf32 if tf32 else prep.ref_lowp
    if tf32:
        measured["noise"] = "tf32"
    problems: list[tuple[Category, str]] = []
    for what, field, got, category in (("output", "out", out, Category.WRONG_OUTPUT),
                                       ("lse", "lse", lse, Category.WRONG_LSE)):
        if got is None:
            continue
        truth = getattr(prep.ref, field)
        c = compare(got, truth, getattr(noise, field), dtype, tolerance)
        if what == "output":
            measured.update(err=c.err, ref_err=c.ref_err, tol=c.tol, ratio=c.ratio)
        else:
            measured.update(lse_err=c.err, lse_tol=c.tol)
        if c.passed:
            continue
        if c.nonfinite:
            problems.append((Category.NONFINITE, _describe(what, c, case)))
        elif fp32 and not tf32 and compare(got, truth, getattr(prep.ref_tf32, field), dtype, tolerance).passed:
            problems.append((Category.FP32_AT_TF32, f"fp32 computed at TF32 precision (within TF32's noise); declare "
                                                    f"Capabilities.fp32_precision = 'tf32' to be judged against TF32: "
                                                    f"{_describe(what, c, case)}"))
        else:
            problems.append((category, _describe(what, c, case)))
    for name, got, writes in kind_of(case.spec).expected_caches(case, prep.inputs):
        wrong = _cache_mismatch(got, writes, prep.inputs, case.poison)
        if wrong:
            problems.append((wrong[0], f"{name}: {wrong[1]}"))
    return problems


def _twins_differ(backend: Backend, twins: list[_Twin], tol: float, measured: dict) -> list[tuple[Category, str]]:
    """Each other call against the judged one: bit for bit where the backend declares it, else within
    the case's tolerance. The largest difference in ULPs goes into `measured` (and determinism)."""
    problems = []
    for t in twins:
        finite = bool(torch.isfinite(t.got).all()) and bool(torch.isfinite(t.want).all())
        ulps = ulp_difference(t.got, t.want) if finite else None
        diff = float((t.got.double() - t.want.double()).abs().max()) if finite and t.got.numel() else 0.0
        if t.claim == "run_to_run":
            measured["deterministic"] = ulps == 0
        if ulps is not None:
            measured["calls_ulp"] = max(ulps, measured.get("calls_ulp") or 0)
        exact = t.claim in backend.capabilities.bit_exact
        if ulps is None:
            problems.append((_TWIN_CATEGORIES[t.claim], f"{t.what}: NaN/Inf where the other call has numbers"))
        elif (exact and ulps) or diff > tol:
            rule = f"declared bit-exact ({t.claim})" if exact else f"> tol {tol:.3g}"
            problems.append((_TWIN_CATEGORIES[t.claim], f"{t.what}: differs by {ulps} ULP (max |diff| {diff:.3g}), "
                                                        f"{rule}"))
    return problems


def _judge_rollout(backend: Backend, spec: CaseSpec, got: Generated, ref: Scores, measured: dict) -> Verdict:
    """A rollout's and its rescore's log-probs against the float64 model's and each other, its tokens
    against the float64 model's choices, its shared prompt blocks untouched (rollout.py)."""
    rule = backend.tolerance or DEFAULT_TOLERANCE
    tolerance = dataclasses.replace(rule, k=rule.k * AMPLIFICATION, reason=f"{rule.reason}; k x {AMPLIFICATION:g} "
                                    "for a model's log-probs (rollout.NOISE_FORMS)")
    problems, worst = [], None
    for name, lp in (("rollout", got.logprobs), ("rescore", got.rescored)):
        # the noisier of the model's own forms in the dtype calibrates the rule
        c = max((compare(lp, ref.truth, form, spec.dtype, tolerance) for form in ref.noise_forms), key=lambda c: c.tol)
        worst = c if worst is None or c.ratio > worst.ratio else worst
        if c.nonfinite:
            problems.append((Category.NONFINITE, f"{name} log-probs: {c.nonfinite} NaN/Inf"))
        elif not c.passed:
            problems.append((Category.WRONG_LOGPROBS, f"{name} log-probs: max err {c.err:.3g} > tol {c.tol:.3g} "
                                                      f"(ref_err {c.ref_err:.3g})"))
    tol = worst.tol
    measured.update(err=worst.err, ref_err=worst.ref_err, tol=tol, ratio=worst.ratio)
    diff = measured["rescore_diff"] = float((got.logprobs - got.rescored).abs().max())
    if not diff <= tol:  # NaN too
        problems.append((Category.ROLLOUT_RESCORE, f"the rescore's log-probs differ from the rollout's by {diff:.3g} "
                                                   f"> tol {tol:.3g}"))
    notes = [f"{len(got.chosen)} tokens; rollout vs rescore max |diff| {diff:.3g}"]
    if ref.divergence:
        sample, step, margin = ref.divergence
        where = f"sample {sample} token {step} is not the float64 model's choice (its margin {margin:.3g}"
        if margin > tol:
            problems.append((Category.TOKENS_DIVERGED, f"{where} > tol {tol:.3g})"))
        else:
            notes.append(f"{where} <= tol {tol:.3g}: a near tie)")
    else:
        notes.append("every token is the float64 model's choice")
    if got.shared_overwritten:
        problems.append((Category.SHARED_BLOCK_WRITE, f"{got.shared_overwritten} slots of shared prompt blocks were "
                                                      "overwritten during the rollout"))
    return _verdict(problems, notes)


def _verdict(problems: list[tuple[Category, str]], notes) -> Verdict:
    """PASS with the notes, or FAIL with every problem's category and text (then the notes)."""
    if not problems:
        return Verdict(Status.PASS, "; ".join(notes))
    categories = tuple(dict.fromkeys(category for category, _ in problems))
    return Verdict(Status.FAIL, "; ".join([text for _, text in problems] + list(notes)), categories)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"


class _BadOutput(Exception):
    pass


def _unpack(returned, case: PagedBatch, backend: Backend):
    out, lse = (returned if isinstance(returned, tuple) else (returned, None))
    want = tuple(case.out.shape)
    if not isinstance(out, torch.Tensor):
        raise _BadOutput(f"{backend.name}.run returned {type(out).__name__}: must return a tensor or (out, lse)")
    if tuple(out.shape) != want or out.dtype != case.spec.dtype or out.device != case.device:
        raise _BadOutput(f"{backend.name}.run output: shape {tuple(out.shape)}, {out.dtype}, {out.device}; "
                         f"must be shape {want}, {case.spec.dtype}, {case.device}")
    if lse is not None:
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != want[:2] or not lse.is_floating_point():
            got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
            raise _BadOutput(f"{backend.name}.run lse: {got}; must be a float tensor of shape {want[:2]}")
    elif backend.capabilities.returns_lse:
        raise _BadOutput(f"{backend.name}.run returned no lse, but its capabilities declare returns_lse")
    return out, lse


def _cache_mismatch(got: torch.Tensor, writes: list, inputs, poison: float) -> tuple[Category, str] | None:
    """The cache as it must be after the run: the expected writes in their slots, poison everywhere
    else. Checked in place, slot by slot, without a second copy of the cache (wide GPU cases hold
    gigabytes of it). A wrong slot in a block that several sequences share is a failure of its own."""
    spec = inputs.spec
    want_shape = (inputs.num_blocks, spec.block_size, *writes[0][1].shape[1:])
    if got.dtype != spec.cache_dtype or tuple(got.shape) != want_shape:
        return Category.WRONG_CACHE_WRITE, (f"{tuple(got.shape)} {got.dtype} after the run; must stay {want_shape} "
                                            f"{spec.cache_dtype}")
    held = bits(got)  # [num_blocks, block_size, ...], strided as the layout lies
    bs = got.shape[1]
    per_slot = tuple(range(2, held.dim()))
    poison_bits = bits(torch.tensor([poison], dtype=got.dtype, device=got.device))
    bad = (held != poison_bits).any(dim=per_slot)  # [num_blocks, block_size]: anything but poison, until proven expected
    for slots, want in writes:
        at = (slots // bs, slots % bs)
        bad[at] = (held[at] != bits(want)).any(dim=tuple(range(1, held.dim() - 1)))
    n = int(bad.sum())
    if not n:
        return None
    in_shared = bad[inputs.shared_blocks.long()]
    if in_shared.any():
        first = int(inputs.shared_blocks[torch.nonzero(in_shared.any(1))[0]])
        return Category.SHARED_BLOCK_WRITE, (f"{int(in_shared.sum())} slots of shared blocks (a prompt that "
                                             f"several sequences read) were overwritten (first: block {first}); "
                                             f"{n} wrong slots in all")
    first = int(torch.nonzero(bad.flatten())[0])
    return Category.WRONG_CACHE_WRITE, (f"{n} slots differ from the expected write (first: block {first // bs}, "
                                        f"offset {first % bs})")


def _describe(what: str, c: Comparison, case: PagedBatch) -> str:
    t = c.worst[0] if c.worst else 0
    qsl = case.query_start_loc.tolist()
    seq = max(i for i in range(len(qsl) - 1) if qsl[i] <= t)
    where = f"seq {seq} query {t - qsl[seq]} head {c.worst[1] if len(c.worst) > 1 else 0}"
    if c.nonfinite:
        return f"{what}: {c.nonfinite} NaN/Inf entries (first at {where})"
    return f"{what}: max err {c.err:.3g} > tol {c.tol:.3g} (ref_err {c.ref_err:.3g}, ratio {c.ratio:.2f}) at {where}"
