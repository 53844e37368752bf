"""Run one backend on one case and judge it: the only place where a Result is made."""
from __future__ import annotations

import time
import traceback
from collections import OrderedDict
from dataclasses import asdict, dataclass
from enum import Enum

import torch

from .memory import SMALL_CASE, DeviceMemory, case_bytes, shrink_local_memory, too_big
from .mla import MLACase
from .paged import Pages, PagedBatch, make_inputs, quantize
from .reference import Reference, reference_attention
from .registry import Backend, Unsupported
from .spec import CaseSpec
from .tolerance import DEFAULT_TOLERANCE, Comparison, compare


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"  # wrong numbers, NaN/Inf, or a wrong cache write
    SKIP = "SKIP"  # the backend cannot run this case here; reason says why
    ERROR = "ERROR"  # the adapter raised, or returned the wrong shape, dtype or device
    CRASH = "CRASH"  # reserved for isolated runs: the worker process died
    TIMEOUT = "TIMEOUT"  # reserved for isolated runs: the worker hung


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

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.case}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        return d


class _Prepared:
    """A case's inputs and both references, shared by every backend run on the same case."""

    def __init__(self, spec: CaseSpec, device: torch.device, seed: int):
        self.inputs: Pages = make_inputs(spec, device, seed)  # Inputs, or MLAInputs for an MLA case
        self.ref: Reference = reference_attention(self.inputs, "float64")
        self.ref_lowp: Reference = reference_attention(self.inputs, "lowp")


class Runner:
    """Runs cases on one device. Keeps the last few prepared cases, so running several backends
    on the same case in a row computes its references once; a big case (more than SMALL_CASE
    bytes) is kept alone. On CUDA, every case is admitted into the GPU's memory ledger first
    (memory.DeviceMemory), so processes sharing the GPU wait for room instead of running out."""

    def __init__(self, device: str | torch.device = "cpu", base_seed: int = 0, keep: int = 2,
                 finite_poison: bool = False):
        self.device = torch.device(device)
        self.base_seed = base_seed
        # Poison unused cache slots with a large finite value for every backend, not NaN: then only
        # reads that change the output fail (a backend's own finite_poison says the same for itself).
        self.finite_poison = finite_poison
        self.results: list[Result] = []  # every result of this runner, in order (reports are written from it)
        self._keep = keep
        self._prepared: OrderedDict[tuple, _Prepared] = OrderedDict()
        self.memory = DeviceMemory.of(self.device) if self.device.type == "cuda" else None
        self.on_admitted = lambda: None  # called when a case got its GPU memory after waiting for it

    def prepared(self, spec: CaseSpec) -> _Prepared:
        key = (spec, self.base_seed)
        if key not in self._prepared:
            need = case_bytes(spec)
            if self._prepared and max(need, *(case_bytes(k[0]) for k in self._prepared)) > SMALL_CASE:
                self._prepared.clear()  # a big case is kept alone
                self._give_back()
            elif len(self._prepared) >= self._keep:
                self._prepared.popitem(last=False)
            self._prepared[key] = _Prepared(spec, self.device, spec.seed(self.base_seed))
        self._prepared.move_to_end(key)
        return self._prepared[key]

    def run(self, backend: Backend, spec: CaseSpec) -> Result:
        result = self._run(backend, spec)
        self.results.append(result)
        return result

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        pass  # nothing to release; IsolatedRunner stops its worker here

    def _run(self, backend: Backend, spec: CaseSpec) -> Result:
        result = blank_result(backend.name, spec, self.device, self.base_seed)
        if settled_before_run(result, backend, spec):
            return result
        if self.memory:
            result.memory_estimate = case_bytes(spec)
            if self.memory.admit(result.memory_estimate):  # waits for room on the GPU
                self.on_admitted()
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()  # the harness's time starts once the case has its memory
        try:
            prep = self.prepared(spec)
            case = prep.inputs.materialize(finite_poison=backend.finite_poison or self.finite_poison)
        except torch.OutOfMemoryError as e:  # the machine's limit, not the backend's fault: say so, go on
            self._prepared.clear()
            self._release()
            result.status, result.reason = Status.ERROR, f"the case does not fit in memory here: {_error(e)}"
            return result
        try:
            return self._run_case(backend, case, prep, result, t0)
        except torch.OutOfMemoryError as e:  # judging needs memory too (the backend's own OOM is its ERROR)
            result.status, result.reason = Status.ERROR, f"the case does not fit in memory here: {_error(e)}"
            return result
        finally:
            del case  # the last reference to its cache: only then can _release give the memory back
            if self.memory:
                result.memory_peak = torch.cuda.max_memory_allocated(self.device)
            self._release()

    def _run_case(self, backend: Backend, case, prep: _Prepared, result: Result, t0: float) -> Result:
        self._sync()
        t_backend = time.perf_counter()
        try:
            backend.write_cache(case)
            returned = backend.run(case)
            self._sync()
        except Unsupported as e:
            result.status, result.reason = Status.SKIP, f"refused at call time: {e}"
            return result
        except Exception as e:  # noqa: BLE001 - an adapter's exception is its result, not the run's end
            result.status, result.reason = Status.ERROR, _error(e)
            return result
        result.backend_seconds = time.perf_counter() - t_backend
        try:
            out, lse = _unpack(returned, case, backend)
        except _BadOutput as e:
            result.status, result.reason = Status.ERROR, str(e)
            return result
        self._judge(result, backend, case, prep, out, lse)
        result.harness_seconds = time.perf_counter() - t0 - result.backend_seconds
        return result

    def _judge(self, result, backend, case, prep, out, lse) -> None:
        tolerance = backend.tolerance or DEFAULT_TOLERANCE
        c = compare(out, prep.ref.out, prep.ref_lowp.out, case.spec.dtype, tolerance)
        result.err, result.ref_err, result.tol, result.ratio = c.err, c.ref_err, c.tol, c.ratio
        problems = []
        if not c.passed:
            problems.append(_describe("output", c, case))
        if lse is not None:
            cl = compare(lse, prep.ref.lse, prep.ref_lowp.lse, case.spec.dtype, tolerance)
            result.lse_err, result.lse_tol = cl.err, cl.tol
            if not cl.passed:
                problems.append(_describe("lse", cl, case))
        for name, got, writes in _expected_caches(case, prep.inputs):
            wrong = _cache_mismatch(got, writes, prep.inputs, case.poison)
            if wrong:
                problems.append(f"{name}: {wrong}")
        if problems:
            result.status, result.reason = Status.FAIL, "; ".join(problems)

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


def blank_result(backend: str, spec: CaseSpec, device: torch.device, base_seed: int) -> Result:
    """A Result before anything ran (status PASS until judged otherwise)."""
    return Result(backend=backend, case=spec.id, scenario=spec.scenario, dtype=spec.dtype_name,
                  block_size=spec.block_size, heads=spec.heads.id, device=str(device),
                  status=Status.PASS, seed=spec.seed(base_seed))


def settled_before_run(result: Result, backend: Backend, spec: CaseSpec) -> bool:
    """Make `result` a SKIP (the backend cannot run the case here, with the reason) or an ERROR (its
    rules raised) without running anything; False when the case is to run."""
    try:
        reason = backend.skip_reason(spec, torch.device(result.device)) or too_big(spec, torch.device(result.device))
    except Exception as e:  # noqa: BLE001 - a broken capability rule is the adapter's error, not the run's end
        result.status, result.reason = Status.ERROR, f"{backend.name}.skip_reason raised {_error(e)}"
        return True
    if reason:
        result.status, result.reason = Status.SKIP, reason
    return bool(reason)


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


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Bits, not values: fp8 codes must match exactly, and untouched poison stays the same NaN."""
    return x.view(_SAME_SIZE_INT[x.element_size()])


def _expected_caches(case: PagedBatch, inputs) -> list[tuple[str, torch.Tensor, list]]:
    """Each cache of the case, with the writes it must hold after the run: (slots, stored values)
    of the context as handed over and of the new tokens (quantized like the default cache write)."""
    if isinstance(case, MLACase):
        new = torch.cat([case.kv_c_new, case.k_pe_new], -1)
        return [("latent_cache", case.latent_cache,
                 [(inputs.context_slots, inputs.stored(inputs.context_index)),
                  (case.slot_mapping, quantize(new, case.kv_scale, case.latent_cache.dtype))])]
    return [(f"{which}_cache", cache,
             [(inputs.context_slots, inputs.stored(which, inputs.context_index)),
              (case.slot_mapping, quantize(new, scale, cache.dtype))])
            for which, cache, new, scale in (("k", case.k_cache, case.k_new, case.k_scale),
                                             ("v", case.v_cache, case.v_new, case.v_scale))]


def _cache_mismatch(got: torch.Tensor, writes: list, inputs, poison: float) -> str:
    """The cache as it must be after the run: the expected writes in their slots, poison everywhere
    else. Checked in place, slot by slot, without a second copy of the cache (wide GPU cases hold
    gigabytes of it)."""
    spec = inputs.spec
    want_shape = (inputs.num_blocks, spec.block_size, *writes[0][1].shape[1:])
    if got.dtype != spec.cache_dtype or tuple(got.shape) != want_shape:
        return f"{tuple(got.shape)} {got.dtype} after the run; must stay {want_shape} {spec.cache_dtype}"
    bits = _bits(got)  # [num_blocks, block_size, ...], strided as the layout lies
    bs = got.shape[1]
    per_slot = tuple(range(2, bits.dim()))
    poison_bits = _bits(torch.tensor([poison], dtype=got.dtype, device=got.device))
    bad = (bits != poison_bits).any(dim=per_slot)  # [num_blocks, block_size]: anything but poison, until proven expected
    for slots, want in writes:
        at = (slots // bs, slots % bs)
        bad[at] = (bits[at] != _bits(want)).any(dim=tuple(range(1, bits.dim() - 1)))
    n = int(bad.sum())
    if not n:
        return ""
    first = int(torch.nonzero(bad.flatten())[0])
    return f"{n} slots differ from the expected write (first: block {first // bs}, offset {first % bs})"


def _describe(what: str, c: Comparison, case: PagedBatch) -> str:
    t = c.worst[0] if c.worst else 0
    qsl = case.query_start_loc.tolist()
    seq = max(i for i in range(len(qsl) - 1) if qsl[i] <= t)
    where = f"seq {seq} query {t - qsl[seq]} head {c.worst[1] if len(c.worst) > 1 else 0}"
    if c.nonfinite:
        return f"{what}: {c.nonfinite} NaN/Inf entries (first at {where})"
    return f"{what}: max err {c.err:.3g} > tol {c.tol:.3g} (ref_err {c.ref_err:.3g}, ratio {c.ratio:.2f}) at {where}"
