"""Tonight's results against last night's (`python -m conformance diff last.json tonight.json`): what a
maintainer reads in the morning. Pairs are matched by their id (backend and case); a report may be
one run's or several merged (`report --json`).

Regressions (the command exits 1 when there is one):
- now failing: FAIL tonight, passed or skipped before (or a new pair);
- new error: ERROR, CRASH or TIMEOUT tonight, and not the same before;
- newly skipped: SKIP tonight but ran before (a capability rule, or a library, started refusing);
- ratio grew: passed both times, err/tol at least RATIO_FACTOR times last night's and at least
  RATIO_FLOOR (closer to failing by a margin that is no noise: a case's data are seeded, so an
  unchanged backend gives the same numbers).
Also listed: fixed pairs, pairs new or gone, and every environment field (library, driver,
torch, GPU) whose value changed. A pair its adapter lists as a known failure (known.py) is no
regression while it fails and the entry has not expired; a probe (probe.py) regresses only when it
is newly wrong without a word.

With `--exact`, for a change that must change nothing (a refactor of the suite or of an adapter):
every pair whose status, categories or any measured number changed at all, and every pair new or
gone, is a regression.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .known import expected
from .report import BAD, read_json
from .result import Result, Status

RATIO_FACTOR = 2.0
RATIO_FLOOR = 0.5
REGRESSIONS = ("now failing", "new error", "newly skipped", "ratio grew")
KINDS = REGRESSIONS + ("fixed", "new pair", "gone", "changed")
# What `--exact` holds every pair to: its verdict and every number a run measures of it.
MEASURED = ("status", "categories", "err", "ref_err", "tol", "ratio", "lse_err", "lse_tol", "calls_ulp",
            "deterministic", "rescore_diff", "noise", "seed")
ERRORS = (Status.ERROR, Status.CRASH, Status.TIMEOUT)


@dataclass(frozen=True)
class Change:
    kind: str  # one of KINDS
    id: str
    before: Result | None
    after: Result | None
    fields: tuple[str, ...] = ()  # "changed": the MEASURED fields that differ

    def line(self) -> str:
        if self.fields:
            return f"{self.id}: " + "; ".join(f"{f} {getattr(self.before, f)!r} -> {getattr(self.after, f)!r}"
                                              for f in self.fields)
        was = _state(self.before) if self.before else "absent"
        now = _state(self.after) if self.after else "absent"
        why = f": {self.after.reason[:160]}" if self.after and self.after.status != Status.PASS else ""
        return f"{self.id}: {was} -> {now}{why}"


def _state(r: Result) -> str:
    return r.status.value + (f" r{r.ratio:.2f}" if r.ratio is not None and r.status != Status.SKIP else "")


def changes(before: list[Result], after: list[Result], factor: float = RATIO_FACTOR,
            floor: float = RATIO_FLOOR) -> list[Change]:
    """Every pair whose verdict changed between the two runs, classified (REGRESSIONS first)."""
    old, new = {r.id: r for r in before}, {r.id: r for r in after}
    out = []
    for rid, a in new.items():
        b = old.get(rid)
        if expected(a):
            continue  # listed by its adapter, with its issue: expected
        if a.probe and a.status != Status.FAIL:
            continue  # a probe that passes or is refused does what it may: only a silently wrong one regresses
        if a.status == Status.FAIL and (b is None or b.status not in BAD):
            out.append(Change("now failing", rid, b, a))
        elif a.status in ERRORS and (b is None or b.status != a.status):
            out.append(Change("new error", rid, b, a))
        elif b is None:
            out.append(Change("new pair", rid, None, a))
        elif a.status == Status.SKIP and b.status != Status.SKIP:
            out.append(Change("newly skipped", rid, b, a))
        elif (a.status == b.status == Status.PASS and a.ratio is not None and b.ratio is not None
              and a.ratio >= max(factor * b.ratio, floor)):
            out.append(Change("ratio grew", rid, b, a))
        elif b.status in BAD and a.status == Status.PASS:
            out.append(Change("fixed", rid, b, a))
    out += [Change("gone", rid, b, None) for rid, b in old.items() if rid not in new]
    return sorted(out, key=lambda c: (KINDS.index(c.kind), c.id))


def exact_changes(before: list[Result], after: list[Result]) -> list[Change]:
    """Every pair new, gone, or whose status, categories or a measured number (MEASURED) is not the
    same (NaN the same as NaN)."""
    old, new = {r.id: r for r in before}, {r.id: r for r in after}
    out = [Change("new pair", rid, None, a) for rid, a in new.items() if rid not in old]
    out += [Change("gone", rid, b, None) for rid, b in old.items() if rid not in new]
    for rid, b in old.items():
        a = new.get(rid)
        moved = tuple(f for f in MEASURED if a is not None and not _same(getattr(b, f), getattr(a, f)))
        if moved:
            out.append(Change("changed", rid, b, a, moved))
    return sorted(out, key=lambda c: (KINDS.index(c.kind), c.id))


def _same(x, y) -> bool:
    return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))


def version_changes(before_env: dict, after_env: dict) -> list[str]:
    """`field old -> new` for each environment field whose value changed."""
    return [f"{k} {before_env.get(k)} -> {after_env.get(k)}" for k in sorted(set(before_env) | set(after_env))
            if before_env.get(k) != after_env.get(k)]


def diff_reports(before_path: str, after_path: str, factor: float = RATIO_FACTOR,
                 floor: float = RATIO_FLOOR, exact: bool = False) -> tuple[str, int]:
    """The Markdown the command prints, and its exit code (1: a regression; with `exact`, any change)."""
    (b_meta, before), (a_meta, after) = read_json(before_path), read_json(after_path)
    found = exact_changes(before, after) if exact else changes(before, after, factor, floor)
    regressions = found if exact else [c for c in found if c.kind in REGRESSIONS]
    lines = [f"# {after_path} against {before_path}", "",
             f"{len(after)} pairs tonight, {len(before)} before; "
             f"{len(regressions)} regression{'s' * (len(regressions) != 1)}"]
    versions = version_changes(b_meta.get("environment", {}), a_meta.get("environment", {}))
    if versions:
        lines += ["", "Environment changed: " + "; ".join(versions)]
    for kind in KINDS:
        of_kind = [c for c in found if c.kind == kind]
        if of_kind:
            shown = 200 if exact or kind in REGRESSIONS else 20  # regressions in full (within reason), else a sample
            title = kind + (f" (passing, err/tol {factor:g}x, to {floor:g} or more)" if kind == "ratio grew" else "")
            lines += ["", f"## {title}: {len(of_kind)}", ""] + [f"- {c.line()}" for c in of_kind[:shown]]
            if len(of_kind) > shown:
                lines.append(f"- ... and {len(of_kind) - shown} more")
    return "\n".join(lines), 1 if regressions else 0
