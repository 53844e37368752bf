"""One run configuration for both front ends, `python -m conformance` and the pytest plugin: the
options (defined once), the backends and cases a run selects and how they pair, the runner and
warm-up the options ask for, and the metadata every JSON report carries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

import conformance.backends  # noqa: F401 - registers the built-in adapters (a plain checkout has no entry points)

from .isolation import make_runner
from .matrix import PROFILE_HELP, Catalog, default_device, default_profile, split_names
from .registry import Backend, select_backends
from .report import environment
from .probe import probes
from .shard import load_durations, parse_shard, shard_of
from .spec import CaseSpec
from .warmup import warm_up

Option = Callable[[str, Any], Any]  # an option's value by its dest name, or the default given


def add_selection_options(add_option) -> None:
    """What selects the backends and cases (argparse's add_argument or pytest's addoption)."""
    add_option("--backend", action="append", help="backend name(s), comma-separated or repeated (default: all)")
    add_option("--scenario", action="append", help="scenario name(s) (default: all of the profile)")
    add_option("--profile", help=PROFILE_HELP)
    add_option("--device", help="torch device (default: cuda if available, else cpu)")
    add_option("--load", action="append", default=[], help="also import this adapter module")
    add_option("--probe", action="store_true", help="also run each single-call case a backend declares unsupported, as "
               "probe-<backend> (conformance/probe.py): does its library refuse it, or accept it silently?")
    add_option("--shard", metavar="I/N", help="run only shard I of N (1 <= I <= N): every test in exactly one shard, "
                                            "the same split everywhere (conformance/shard.py)")
    add_option("--shard-durations", action="append", default=[], metavar="REPORT",
               help="JSON report(s) of an earlier run whose durations balance the shards (default: by count)")


def add_run_options(add_option) -> None:
    """How the selected cases run."""
    add_option("--warm-up-jobs", type=int, default=4, metavar="N",
               help="build JIT-compiled kernel variants in N processes before the run (0: off; default 4)")
    add_option("--isolate", choices=("auto", "on", "off"), default="auto",
               help="run each backend's cases in a worker process, so a crash or hang is that case's CRASH or "
                    "TIMEOUT and the run goes on (auto: on with CUDA, off on CPU)")
    add_option("--case-timeout", type=float, default=300.0, metavar="SECONDS",
               help="isolated runs: a case with no result after this long is a TIMEOUT (default 300)")
    add_option("--poison", choices=("nan", "finite"), default="nan",
               help="what fills unused cache slots: NaN shows any read of one; a large finite value only reads that "
                    "change the output (default nan; backends that mask by multiplying with 0 always get finite)")


@dataclass(frozen=True)
class RunConfig:
    backends: tuple[Backend, ...]
    cases: tuple[CaseSpec, ...]
    profile: str
    device: torch.device
    modules: tuple[str, ...] = ()  # --load: adapter modules the run (and its worker processes) import
    seed: int = 0
    warm_up_jobs: int = 4
    isolate: str = "auto"
    case_timeout: float = 300.0
    poison: str = "nan"
    probe: bool = False  # --probe
    shard: tuple[int, int] | None = None  # (I, N) of --shard
    shard_durations: tuple[str, ...] = ()  # --shard-durations reports

    @classmethod
    def from_options(cls, option: Option, catalog: Catalog, main_job: bool = False) -> "RunConfig":
        """The run the options ask for; RegistryError or SpecError (each naming the option) on bad ones."""
        modules = tuple(option("load", ()))
        profile = option("profile", None) or default_profile(main_job)
        how = {name: option(name, getattr(cls, name)) for name in ("seed", "warm_up_jobs", "isolate", "case_timeout",
                                                                   "poison", "probe")}
        shard = option("shard", None)
        return cls(backends=tuple(select_backends(split_names(option("backend", None)), modules)),
                   cases=tuple(catalog.cases(profile, split_names(option("scenario", None)))),
                   profile=profile, device=default_device(option("device", None)), modules=modules,
                   shard=parse_shard(shard) if shard else None,
                   shard_durations=tuple(option("shard_durations", ())), **how)

    def pairs(self) -> list[tuple[Backend, CaseSpec]]:
        """Every backend on every case of its kind (with --probe, then the probes). Backends vary
        fastest: a runner computes a case's references once for all of them."""
        pairs = [(b, spec) for spec in self.cases for b in self.backends if b.kind == spec.kind]
        return pairs + probes(pairs, self.device) if self.probe else pairs

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
        warm_up(list(self.backends), list(self.cases), self.device, self.warm_up_jobs if jobs is None else jobs,
                self.modules, wanted)

    def report_meta(self, seed: int | None = None) -> dict:
        """What a JSON report says about its run (write_json's meta)."""
        return {"profile": self.profile, "seed": self.seed if seed is None else seed,
                "environment": environment(self.device), "backends": {b.name: b.description for b in self.backends}}
