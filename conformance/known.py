"""Known failures as data: an adapter lists the pairs it is known to fail (Backend.known_failures),
each with a reason, a link to the issue and an expiry date, on every device or on GPUs of one compute
capability only.

A pair that matches one and fails is an expected failure (pytest XFAIL; `run` does not count it);
one that passes is reported as such and fails the test (strict: remove the entry); an entry past
its date fails the test whatever the pair does (fix the bug or renew the entry, with a reason).
"""
from __future__ import annotations

import datetime
import fnmatch
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class KnownFailure:
    cases: str  # a glob over the case id (the test id after the backend name), e.g. "*-fp32-*-cap4"
    reason: str
    link: str  # the issue that tracks it
    expires: str  # YYYY-MM-DD: the last day it is expected
    compute_capability: tuple[int, int] | None = None  # only on GPUs of this (major, minor), e.g. (9, 0)

    def __post_init__(self):
        for field, ok, rule in (("cases", bool(self.cases), "must be a non-empty glob over case ids"),
                                ("reason", bool(self.reason), "must say why the pair fails"),
                                ("link", self.link.startswith(("https://", "http://")), "must be the issue's URL"),
                                ("expires", _date(self.expires) is not None, "must be a date, YYYY-MM-DD"),
                                ("compute_capability", self.compute_capability is None or (
                                    isinstance(self.compute_capability, tuple) and len(self.compute_capability) == 2
                                    and all(isinstance(x, int) for x in self.compute_capability)),
                                 "must be None (every device) or a (major, minor) pair of ints, e.g. (9, 0)")):
            if not ok:
                raise ValueError(f"KnownFailure.{field} = {getattr(self, field)!r}: {rule}")

    def matches(self, case_id: str) -> bool:
        return fnmatch.fnmatchcase(case_id, self.cases)


def _date(text: str) -> datetime.date | None:
    try:
        return datetime.date.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def known_failure(backend, case_id: str, device: torch.device) -> dict | None:
    """The first of the backend's known failures that matches the case on this device, as a Result
    records it."""
    here = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    entry = next((k for k in getattr(backend, "known_failures", ())
                  if k.matches(case_id) and k.compute_capability in (None, here)), None)
    return asdict(entry) if entry else None


def expected(result) -> bool:
    """Whether a result is a known failure that failed as listed, before its date: an XFAIL."""
    known = known_outcome(result)
    return known is not None and known[0] == "xfail"


def known_outcome(result, today: datetime.date | None = None) -> tuple[str, str] | None:
    """For a result whose pair is a known failure: ("expired" | "xfail" | "xpass", what to tell the
    user); None otherwise, or for a skip."""
    known = result.known_failure
    if not known or result.status.value == "SKIP":
        return None
    where = f"{known['link']}: {known['reason']}"
    if (today or datetime.date.today()) > _date(known["expires"]):
        return "expired", f"the known failure of {result.id} expired on {known['expires']} ({where}): fix the " \
                          f"bug or renew the entry with a new date"
    if result.status.value == "PASS":
        return "xpass", f"{result.id} is listed as a known failure but passes: remove the entry ({where})"
    return "xfail", f"known failure until {known['expires']} ({where}); {result.status.value}: {result.reason}"
