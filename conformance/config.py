"""One run configuration for both front ends, `python -m conformance` and the pytest plugin: the
options' values (the options are defined once, in options.py), the backends and cases a run selects and how they pair, the runner and
warm-up the options ask for, and the metadata every JSON report carries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from _pytest.mark import KeywordMatcher  # pytest's own, so that `run -k` selects what `pytest -k` would
from _pytest.mark import expression as pytest_expression

import conformance.backends  # noqa: F401 - registers the built-in adapters (a plain checkout has no entry points)

from .isolation import make_runner
from .kinds import KINDS
from .matrix import Catalog, default_device, default_profile, split_names
from .options import default
from .registry import Backend, select_backends
from .report import environment
from .probe import probes
from .shard import load_durations, parse_shard, shard_of
from .spec import CaseSpec, SpecError
from .warmup import warm_up

Option = Callable[[str], Any]  # an option's value by its name in the options table (options.py)


@dataclass(frozen=True)
class RunConfig:
    backends: tuple[Backend, ...]
    cases: tuple[CaseSpec, ...]
    profile: str
    device: torch.device
    modules: tuple[str, ...] = ()  # load: adapter modules the run (and its worker processes) import
    seed: int = default("seed")
    warm_up_jobs: int = default("warm_up_jobs")
    isolate: str = default("isolate")
    case_timeout: float = default("case_timeout")
    poison: str = default("poison")
    probe: bool = False
    shard: tuple[int, int] | None = None  # (I, N)
    shard_durations: tuple[str, ...] = ()  # reports
    keyword: str | None = None  # a -k expression over the pairs' test ids

    @classmethod
    def from_options(cls, option: Option, catalog: Catalog, main_job: bool = False) -> "RunConfig":
        """The run the options ask for; RegistryError or SpecError (each naming the option) on bad ones.
        `option(name)` is the option's value, or its default where this front end has no such option."""
        modules = tuple(option("load") or ())
        profile = option("profile") or default_profile(main_job)
        how = {name: option(name) for name in ("seed", "warm_up_jobs", "isolate", "case_timeout", "poison")}
        shard, keyword = option("shard"), option("keyword")
        if keyword:
            _keyword_matches(keyword, set())  # a bad expression is named before anything runs
        return cls(backends=tuple(select_backends(split_names(option("backend")), modules)),
                   cases=tuple(catalog.cases(profile, split_names(option("scenario")))),
                   profile=profile, device=default_device(option("device")), modules=modules,
                   shard=parse_shard(shard) if shard else None, probe=bool(option("probe")),
                   shard_durations=tuple(option("shard_durations") or ()), keyword=keyword or None, **how)

    def pairs(self) -> list[tuple[Backend, CaseSpec]]:
        """Every backend on every case of its kind (with probe, then the probes), those -k matches.
        Backends vary fastest: a runner computes a case's references once for all of them."""
        pairs = [(b, spec) for spec in self.cases for b in self.backends if b.kind == spec.kind]
        pairs = pairs + probes(pairs, self.device) if self.probe else pairs
        if self.keyword:
            pairs = [(b, s) for b, s in pairs if _keyword_matches(self.keyword, KINDS[s.kind].keywords(b.name, s.id))]
        return pairs

    def in_shard(self, keys: list[str], result_ids: list[str | None]) -> list[bool]:
        """Which tests (unique keys; result_ids: the Result id of each, None for a test that is no
        backend x case pair) this run's --shard keeps: all of them without one."""
        if not self.shard:
            return [True] * len(keys)
        i, n = self.shard
        seconds = load_durations(self.shard_durations)
        known = {k: seconds[r] for k, r in zip(keys, result_ids) if r in seconds}
        return [s == i - 1 for s in shard_of(keys, n, known)]

    def runner(self, seed: int | None = None, device: torch.device | None = None):
        return make_runner(device or self.device, self.seed if seed is None else seed, self.isolate,
                           self.case_timeout, self.poison, self.modules)

    def runners(self) -> list:
        """One runner for the device, or, on CUDA without a GPU named (--device) and with several
        visible, one for each GPU: `run` spreads its cases over them."""
        gpus = torch.cuda.device_count() if self.device == torch.device("cuda") else 1
        if gpus < 2:
            return [self.runner()]
        return [self.runner(device=torch.device("cuda", i)) for i in range(gpus)]

    def warm_up(self, jobs: int | None = None, wanted=None) -> None:
        """Build the kernel variants of the pairs `wanted` picks (default: those -k selects, or all)."""
        if wanted is None and self.keyword:
            wanted = lambda b, s, chosen=set(self.pairs()): (b, s) in chosen  # noqa: E731
        warm_up(list(self.backends), list(self.cases), self.device, self.warm_up_jobs if jobs is None else jobs,
                self.modules, wanted)

    def report_meta(self, seed: int | None = None) -> dict:
        """What a JSON report says about its run (write_json's meta)."""
        return {"profile": self.profile, "seed": self.seed if seed is None else seed,
                "environment": environment(self.device), "backends": {b.name: b.description for b in self.backends}}


_BAD_EXPRESSION = getattr(pytest_expression, "ParseError", SyntaxError)  # pytest 8 has its own; 9 a SyntaxError


def _keyword_matches(expression: str, names: set[str]) -> bool:
    """pytest's own -k: `expression` over the names of a test (substrings, case-insensitive)."""
    try:
        return pytest_expression.Expression.compile(expression).evaluate(KeywordMatcher(names))
    except _BAD_EXPRESSION as e:
        raise SpecError(f"keyword = {expression!r}: not a pytest -k expression ({e})") from None
