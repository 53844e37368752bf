"""Judging: one call's output, LSE and cache against the references, and other calls' outputs
against it. Each judge returns what it measured and what it found wrong (a Judgment), never a
dict filled on the side; a call mode (modes/) puts its calls' judgments together."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .kinds import kind_of
from .paged import PagedBatch, bits
from .result import Category, Status, Verdict
from .tolerance import DEFAULT_TOLERANCE, Comparison, compare, ulp_difference

Problem = tuple[Category, str]  # what is wrong, for machines and for people


@dataclass(frozen=True)
class Numbers:
    """What judging measured, as the Result reports it (None: not measured)."""

    err: float | None = None
    ref_err: float | None = None
    tol: float | None = None
    ratio: float | None = None
    lse_err: float | None = None
    lse_tol: float | None = None
    noise: str | None = None  # "tf32": the tolerance calibrated to TF32's noise, as declared
    calls_ulp: int | None = None  # many calls: the largest difference from the judged call, in ULPs
    deterministic: bool | None = None  # the same call again gave the same bits
    rescore_diff: float | None = None  # a rollout: max |rollout - rescore| of the log-probs

    def fields(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Judgment:
    """A run's findings: its problems (none: PASS), notes for the reason, and its numbers."""

    problems: tuple[Problem, ...] = ()
    notes: tuple[str, ...] = ()
    numbers: Numbers = Numbers()

    def verdict(self) -> Verdict:
        """PASS with the notes, or FAIL with every problem's category and text (then the notes)."""
        if not self.problems:
            return Verdict(Status.PASS, "; ".join(self.notes))
        categories = tuple(dict.fromkeys(category for category, _ in self.problems))
        return Verdict(Status.FAIL, "; ".join([text for _, text in self.problems] + list(self.notes)), categories)


def judge_output(backend, case: PagedBatch, prep, out: torch.Tensor, lse: torch.Tensor | None) -> Judgment:
    """One call's output and LSE against the case's references (`prep`: Prepared), and its caches
    against the writes they must hold."""
    tolerance, dtype = backend.tolerance or DEFAULT_TOLERANCE, case.spec.dtype
    fp32 = dtype == torch.float32
    tf32 = fp32 and backend.capabilities.fp32_precision == "tf32"
    noise = prep.ref_tf32 if tf32 else prep.ref_lowp
    problems: list[Problem] = []
    numbers = {"noise": "tf32"} if tf32 else {}
    for what, field, got, category in (("output", "out", out, Category.WRONG_OUTPUT),
                                       ("lse", "lse", lse, Category.WRONG_LSE)):
        if got is None:
            continue
        truth = getattr(prep.ref, field)
        c = compare(got, truth, getattr(noise, field), dtype, tolerance)
        if what == "output":
            numbers.update(err=c.err, ref_err=c.ref_err, tol=c.tol, ratio=c.ratio)
        else:
            numbers.update(lse_err=c.err, lse_tol=c.tol)
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
    return Judgment(tuple(problems), numbers=Numbers(**numbers))


@dataclass(frozen=True)
class Twin:
    """Another call's output for the same rows as the judged one, which must match it."""

    what: str  # for the reason: "padded batch", "tokens against one call" ...
    claim: str  # the registry.BIT_EXACT name a backend declares to promise the same bits
    got: torch.Tensor
    want: torch.Tensor


TWIN_CATEGORIES = {"chunks": Category.PATH_MISMATCH, "tokens": Category.PATH_MISMATCH,
                   "batch": Category.BATCH_VARIANT, "run_to_run": Category.NONDETERMINISTIC}


def judge_twins(backend, twins: list[Twin], tol: float) -> Judgment:
    """Each other call against the judged one: bit for bit where the backend declares it, else within
    the case's tolerance `tol`. Measures the largest difference in ULPs (and, for the same call made
    again, determinism)."""
    problems, worst, deterministic = [], None, None
    for t in twins:
        finite = bool(torch.isfinite(t.got).all()) and bool(torch.isfinite(t.want).all())
        ulps = ulp_difference(t.got, t.want) if finite else None
        diff = float((t.got.double() - t.want.double()).abs().max()) if finite and t.got.numel() else 0.0
        if t.claim == "run_to_run":
            deterministic = ulps == 0
        if ulps is not None:
            worst = max(ulps, worst or 0)
        exact = t.claim in backend.capabilities.bit_exact
        if ulps is None:
            problems.append((TWIN_CATEGORIES[t.claim], f"{t.what}: NaN/Inf where the other call has numbers"))
        elif (exact and ulps) or diff > tol:
            rule = f"declared bit-exact ({t.claim})" if exact else f"> tol {tol:.3g}"
            problems.append((TWIN_CATEGORIES[t.claim], f"{t.what}: differs by {ulps} ULP (max |diff| {diff:.3g}), "
                                                       f"{rule}"))
    return Judgment(tuple(problems), numbers=Numbers(calls_ulp=worst, deterministic=deterministic))


def with_twins(judged: Judgment, twins: Judgment, notes=()) -> Judgment:
    """The judged call's findings, then its twins' (their numbers joined to its own) and `notes`."""
    numbers = dataclasses.replace(judged.numbers, calls_ulp=twins.numbers.calls_ulp,
                                  deterministic=twins.numbers.deterministic)
    return Judgment(judged.problems + twins.problems, judged.notes + tuple(notes), numbers)


def _cache_mismatch(got: torch.Tensor, writes: list, inputs, poison: float) -> Problem | None:
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
    # [num_blocks, block_size]: anything but poison, until proven expected
    bad = (held != poison_bits).any(dim=per_slot)
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
