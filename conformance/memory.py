"""GPU memory admission: every process of the suite on one GPU shares its memory through a ledger.

pytest-xdist workers (and their isolated case workers) each run cases on the same GPU and know
nothing of each other; six of them each holding a 37 GB `wide_decode` case run an H200 out of
memory. So a case carries an estimate of the device memory it needs (its call mode's, modes.case_bytes,
built on call_bytes here), and before a
big one a process claims that much in a per-GPU ledger (a small JSON file under the temp dir,
locked with flock, one entry per process id) and waits while the claims of the others leave no
room. Small cases run under each process's standing idle claim, without touching the ledger, so
the common case costs nothing. A case that cannot fit even alone is a SKIP that says how much it
needs and how much the GPU has.

The ledger knows only what the suite claims, so a big case must also fit in what the GPU really
has free (memory the claims miss: CUDA contexts, other programs, a spilling kernel's local memory).
Idle claims count too: a process between cases holds its context and what stays prepared, and with
32 workers on one GPU those alone can fill it (measured on an H200: a big case let in past them ran
out of memory). So a process drops the prepared cases it will not reuse before it waits (the runner
does), and a big case waits while the claims leave no room or the GPU has not enough free. Progress
is guaranteed: when nothing runs and the ledger has not changed for STALL_SECONDS, no one is going
to give memory back, and the case goes ahead anyway (the estimate may be generous). The GPU's free
memory moving counts as a change: processes running small cases change no claim, yet are not idle
(on an H100, a big case let in after 10 s of unchanged claims ran out of memory beside fifteen of
them).

Local memory: a kernel that spills registers makes the driver grow the context's per-thread stack
and keep that much local memory for every thread the GPU can hold, for the context's whole life.
On an H200 our Triton kernel in fp32 at d256 (22 KB a thread) left 5.3 GiB in each process; sixteen
xdist workers held 100 GiB between cases and big cases ran out of memory. After every case the
runner sets the stack limit back (shrink_local_memory), which returns it (measured: 5.27 GiB).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .kinds import kind_of
from .reference import SCORE_CHUNK_ELEMENTS
from .registry import Capabilities
from .spec import CaseSpec

GiB = 1 << 30
IDLE_CLAIM = 2 * GiB  # a process between cases: its CUDA context, caching allocator, small cases
SMALL_CASE = GiB  # cases up to this run under the idle claim (two of them may stay prepared)
BUDGET_FRACTION = 0.95  # of the GPU's memory, for all claims together
POLL_SECONDS = 0.2
STALL_SECONDS = 10.0  # nothing runs and no claim changed this long: waiting longer frees nothing


@functools.lru_cache(maxsize=8192)  # asked for on every run of a case
def call_bytes(spec: CaseSpec, cache_copies: float = Capabilities.cache_copies) -> int:
    """An upper estimate of the device memory one backend run of `spec` in one call takes in a
    runner (whatever its call mode; a mode's estimate builds on this one): the paged cache, the
    logical inputs and both references, the reference's padded queries and accumulators (a ragged
    batch pads every sequence to the longest query) and chunked working set, the cache check's
    masks, the harness's working copies of slices of the cache and, for a quantized cache, of the
    tokens in fp32; then the adapter's: `cache_copies` copies of the cache (Capabilities.cache_copies),
    each sequence's keys expanded to every query head, a sparse case's listed keys; and a margin.
    Against the peaks measured on an H200 (results/README.md), the harness's part alone covers
    every big case of the backends that declare no copies; flex, which pads a copy, needed 1.5."""
    b, h = spec.batch, spec.heads
    elem = torch.empty((), dtype=spec.dtype).element_size()
    token = h.cache_elements_per_token
    cache = cache_bytes(spec)
    logical = sum(b.seq_lens) * token * elem + b.num_query_tokens * h.num_q_heads * h.head_dim * elem
    references = b.num_query_tokens * h.num_q_heads * (h.out_dim * (8 + elem + 3 * 8) + 4 * 8)
    qk, v = kind_of(spec).reference_widths(h)
    padded = b.batch_size * max(b.query_lens) * h.num_q_heads * (qk + 3 * v) * 8  # float64; acc lives thrice
    scores = b.batch_size * h.num_q_heads * max(b.query_lens) * max(b.seq_lens)  # all at once, if under a chunk
    reference_chunks = 8 * min(scores, SCORE_CHUNK_ELEMENTS) * 8
    cache_check = 2 * spec.pool_blocks * spec.block_size * token
    working = cache // 2 + (sum(b.seq_lens) * token * 4 if spec.cache_dtype != spec.dtype else 0)
    adapter = int(cache_copies * cache) + max(b.seq_lens) * h.num_q_heads * (h.head_dim + h.out_dim) * 4 * 2
    if spec.topk:  # sparse: the reference's mask of listed keys; an adapter's gathered latents (fp32, twice)
        adapter += b.batch_size * max(b.query_lens) * max(b.seq_lens) + 2 * b.num_query_tokens * spec.topk * token * 4
    # A margin: the peaks measured on an H200 reached 1.05 times the rest (split-KV partials) and 0.65 GiB
    # over it (small MLA cases over fp8 latents).
    return int(1.1 * (cache + logical + references + padded + reference_chunks + cache_check + working + adapter)) \
        + GiB // 2


def cache_bytes(spec: CaseSpec) -> int:
    """The paged cache's bytes."""
    return spec.pool_blocks * spec.block_size * spec.cache_bytes_per_token


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def too_big(need: int, device: torch.device) -> str | None:
    """Why a case that needs `need` bytes cannot run on `device` even alone, or None (CPU cases are
    not admitted)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if need + IDLE_CLAIM > BUDGET_FRACTION * total:
        return (f"needs about {gib(need)} of GPU memory (estimate: cache, inputs, references, adapter "
                f"copies); the GPU has {gib(total)}")
    return None


class DeviceMemory:
    """This process's claim on one GPU's memory, in the ledger every process of the suite shares.
    A claim is (bytes, running): running while a big case runs, else what the process still holds
    between cases (a prepared case's inputs and references). A big case waits for room in both the
    claims and the GPU's free memory; the stall rule (STALL_SECONDS) ends every wait."""

    def __init__(self, path: Path, budget: int, free: Callable[[], int], pid: int | None = None,
                 stall_seconds: float = STALL_SECONDS):
        self.path, self.budget, self.free, self.pid = path, budget, free, pid or os.getpid()
        self.stall_seconds = stall_seconds
        self.claim: tuple[int, bool] | None = None

    @classmethod
    def of(cls, device: torch.device) -> "DeviceMemory":
        props = torch.cuda.get_device_properties(device)
        gpu = str(getattr(props, "uuid", device.index or 0))  # the same GPU under any CUDA_VISIBLE_DEVICES
        return cls(Path(tempfile.gettempdir()) / f"attention-conformance-gpu-{gpu}.ledger",
                   int(BUDGET_FRACTION * props.total_memory), lambda: torch.cuda.mem_get_info(device)[0])

    def admit(self, need: int, on_wait=lambda: None) -> bool:
        """Claim `need` bytes for the case about to run, waiting while the others' claims leave no
        room in the budget, or the GPU has not that much free beside the big cases running (their
        claims count in full: some of it they may not have allocated yet). When nothing runs, the
        GPU's free memory alone decides, until the ledger stalls (see the module docstring). A small
        case runs under the idle claim without waiting. on_wait() is called once, when it starts to
        wait. True when it waited."""
        if need <= IDLE_CLAIM:
            self._set((IDLE_CLAIM, False))
            return False
        waited, seen, since = False, None, time.monotonic()
        while True:
            with _ledger(self.path) as claims:
                others = {pid: claim for pid, claim in claims.items() if pid != self.pid}
                running = sum(n for n, is_running in others.values() if is_running)
                free = self.free()
                fits = sum(n for n, _ in others.values()) + need <= self.budget and running + need <= free
                # A change: another claim, or the GPU's free memory moving by a GiB (other processes
                # running small cases under their idle claims change no claim, but are not idle).
                if seen is None or others != seen[0] or abs(free - seen[1]) >= GiB:
                    seen, since = (others, free), time.monotonic()
                stalled = not running and time.monotonic() - since >= self.stall_seconds
                if fits or (not running and need <= free) or stalled:
                    claims[self.pid] = self.claim = (need, True)
                    return waited
            if not waited:
                on_wait()
            waited = True
            time.sleep(POLL_SECONDS)

    def settle(self, held: int) -> None:
        """Between cases: claim only what this process still holds."""
        self._set((max(held, IDLE_CLAIM), False))

    def _set(self, claim: tuple[int, bool]) -> None:
        if claim != self.claim:
            with _ledger(self.path) as claims:
                claims[self.pid] = self.claim = claim


_STACK_SIZE, _DEFAULT_STACK = 0, 1024  # CU_LIMIT_STACK_SIZE, and the driver's default per-thread stack


@functools.cache
def _libcuda() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")  # the driver API; CUDA's runtime holds it open already
    except OSError:
        return None


def shrink_local_memory(lib: ctypes.CDLL | None = None) -> bool:
    """Give back the local memory the current CUDA context kept for a spilling kernel (see the module
    docstring) by setting its per-thread stack limit back to the default; a kernel that needs more
    gets it again at its next launch. True when it shrank."""
    lib = lib or _libcuda()
    if lib is None:
        return False
    stack = ctypes.c_size_t()
    if lib.cuCtxGetLimit(ctypes.byref(stack), _STACK_SIZE) != 0 or stack.value <= _DEFAULT_STACK:
        return False
    return lib.cuCtxSetLimit(_STACK_SIZE, ctypes.c_size_t(_DEFAULT_STACK)) == 0


@contextlib.contextmanager
def _ledger(path: Path):
    """The ledger, locked while open: {pid: (bytes, running)}, dead processes dropped."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        f.seek(0)
        text = f.read()
        claims = {int(pid): tuple(c) for pid, c in (json.loads(text) if text else {}).items() if _alive(int(pid))}
        yield claims
        f.seek(0)
        f.truncate()
        json.dump(claims, f)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
