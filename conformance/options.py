"""Every option of the suite, defined once: the CLI (`python -m conformance COMMAND`), the pytest
plugin, RunConfig's defaults and docs/options.md are made from this table.

In pytest an option takes the prefix `--attn-` (`--attn-backend sdpa`), so that none can clash with
another plugin's (`--json-report` is pytest-json-report's, `--profile` pytest-profiling's, `--timeout`
pytest-timeout's); the CLI is the suite's own and takes the plain name (`run --backend sdpa`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .diff import RATIO_FACTOR, RATIO_FLOOR
from .spec import DTYPES, KV_DTYPES

PYTEST_PREFIX = "--attn-"
PYTEST = "pytest"  # the pytest plugin, in Option.commands beside the CLI's commands
COMMANDS = ("run", "flake-check", "warm-up", "bench", "list", "report", "diff", PYTEST)

_SELECT = ("run", "flake-check", "warm-up", "bench", PYTEST)  # what picks backends and cases
_RUN = ("run", "flake-check", PYTEST)  # how the picked cases run


@dataclass(frozen=True)
class Option:
    name: str  # RunConfig's field and argparse's dest; the CLI's --name (- for _), pytest's --attn-name
    help: str
    commands: tuple[str, ...]
    default: Any = None
    type: Callable | None = None
    choices: tuple | None = None
    action: str | None = None  # "append" (repeatable) or "store_true" (a switch)
    metavar: str | None = None
    short: str | None = None  # a one-letter CLI flag beside the long one (pytest has its own letters)

    def __post_init__(self):
        unknown = sorted(set(self.commands) - set(COMMANDS))
        if unknown:
            raise ValueError(f"Option({self.name}).commands = {unknown}: must be among {COMMANDS}")

    def flag(self, command: str) -> str:
        long = self.name.replace("_", "-")
        return PYTEST_PREFIX + long if command == PYTEST else "--" + long

    def dest(self, command: str) -> str:
        return self.flag(command).lstrip("-").replace("-", "_")

    def add_to(self, add_option: Callable, command: str) -> None:
        """Add this option to argparse's add_argument or pytest's addoption."""
        kwargs = {k: v for k, v in (("type", self.type), ("choices", self.choices), ("action", self.action),
                                    ("metavar", self.metavar)) if v is not None}
        if self.action == "append":
            kwargs["default"] = list(self.default or ())  # a fresh list: argparse appends to it
        elif self.action != "store_true":
            kwargs["default"] = self.default
        flags = [self.short] if self.short and command != PYTEST else []
        add_option(*flags, self.flag(command), dest=self.dest(command), help=self.described(), **kwargs)

    def described(self) -> str:
        shown = self.default not in (None, False, "", ())
        return self.help + (f" (default {self.default})" if shown else "")


OPTIONS: tuple[Option, ...] = (
    Option("backend", "backend name(s), comma-separated or repeated (default: all registered)", _SELECT,
           action="append", metavar="NAME"),
    Option("scenario", "scenario name(s), comma-separated or repeated (default: all of the profile)", _SELECT,
           action="append", metavar="NAME"),
    Option("profile", "the cases: a profile of the catalog (`python -m conformance list` and docs/profiles.md show "
           "them; default gpu with CUDA, else quick for `run` and cpu for pytest)", _SELECT, metavar="NAME"),
    Option("keyword", "only the backend x case pairs whose test id matches EXPR, with pytest's -k meaning "
           "(e.g. 'flex and mixed_small and not fp32')", ("run", "flake-check", "warm-up"), metavar="EXPR", short="-k"),
    Option("device", "torch device (default: cuda if available, else cpu)", _SELECT),
    Option("load", "also import this adapter module (backends or KV-cache managers of yours)",
           _SELECT + ("list",), action="append", metavar="MODULE"),
    Option("probe", "also run each single-call case a backend declares unsupported, as probe-<backend>: does its "
           "library refuse it, or accept it silently?", _RUN, action="store_true"),
    Option("shard", "run only shard I of N (1 <= I <= N): every test in exactly one shard, the same split everywhere",
           _RUN, metavar="I/N"),
    Option("shard_durations", "JSON report(s) of an earlier run whose durations balance the shards "
           "(default: by count)", _RUN, action="append", metavar="REPORT"),
    Option("seed", "base seed mixed into every case's seed (flake-check: the first of --seeds)", _RUN, 0, type=int),
    Option("seeds", "how many base seeds", ("flake-check",), 20, type=int),
    Option("warm_up_jobs", "build JIT-compiled kernel variants in N processes before the run (0: off)",
           _RUN + ("warm-up",), 4, type=int, metavar="N", short="-j"),
    Option("isolate", "run each backend's cases in a worker process, so a crash or hang is that case's CRASH or "
           "TIMEOUT and the run goes on (auto: on with CUDA, off on CPU)", _RUN, "auto", choices=("auto", "on", "off")),
    Option("case_timeout", "isolated runs: a case with no result after this many seconds is a TIMEOUT", _RUN, 300.0,
           type=float, metavar="SECONDS"),
    Option("poison", "what fills unused cache slots: NaN shows any read of one; a large finite value only reads "
           "that change the output (backends that mask by multiplying with 0 always get finite)", _RUN, "nan",
           choices=("nan", "finite")),
    Option("json", "write every result to this JSON report (pytest with xdist: one file per worker, PATH with "
           ".gw0, .gw1 ... before .json; flake-check: one per seed, .seed<N>; report: the merged results; bench: its "
           "rows); merge reports with `python -m conformance report`", _RUN + ("report", "bench"), "", metavar="PATH"),
    Option("verbose", "list every skip reason, not one line per cause", ("run", "flake-check"), action="store_true",
           short="-v"),
    Option("html", "also write a self-contained HTML report here (sortable, filterable, each failure with the "
           "command that reruns it)", ("report",), "", metavar="PATH"),
    Option("heatmap", "also write a PNG of the worst err/tol per backend x scenario (the `plots` extra)",
           ("report",), "", metavar="PATH"),
    Option("reestimate", "before comparing the memory estimates with the measured peaks, estimate each pair again "
           "with this version's rule (its case from the catalog, its backend's declared cache copies): how a new "
           "rule would have done on an earlier run", ("report",), action="store_true"),
    Option("flakes", "the reports are runs of the same cases over several base seeds (flake-check --json, or pytest "
           "--attn-seed N --attn-json): report the pairs that fail on some seed, flaky ones first", ("report",),
           action="store_true"),
    Option("ratio_factor", "a passing pair's err/tol that grew this many times ...", ("diff",), RATIO_FACTOR,
           type=float),
    Option("ratio_floor", "... to at least this is a regression", ("diff",), RATIO_FLOOR, type=float),
    Option("exact", "every pair must keep its status, categories and every measured number (err, tol, ratio, "
           "ULPs ...), and no pair may be new or gone: any change is a regression (for a change that must "
           "change nothing, such as a refactor)", ("diff",), action="store_true"),
    Option("heads", "head-config preset, dense or MLA", ("bench",), "llama3_8b", metavar="NAME"),
    Option("dtype", "query and cache dtype", ("bench",), "bf16", choices=tuple(DTYPES)),
    Option("block_size", "page size in tokens", ("bench",), 16, type=int),
    Option("kv_dtype", "cache dtype", ("bench",), "auto", choices=KV_DTYPES),
    Option("iters", "calls per timed repeat", ("bench",), 20, type=int),
    Option("baseline", "backend(s) the 'vs' column compares with: the first that passed on a case", ("bench",),
           action="append", metavar="NAME"),
)
BY_NAME = {o.name: o for o in OPTIONS}


def add_options(add_option: Callable, command: str) -> None:
    """Every option of `command` ("run", ..., or PYTEST) through argparse's add_argument or pytest's addoption."""
    for option in OPTIONS:
        if command in option.commands:
            option.add_to(add_option, command)


def default(name: str) -> Any:
    return BY_NAME[name].default


def pytest_flag(name: str) -> str:
    """The flag a pytest command line gives option `name` (e.g. a rerun command in a report)."""
    return BY_NAME[name].flag(PYTEST)


def options_markdown() -> str:
    """docs/options.md's table."""
    rows = ["| option | `python -m conformance` | pytest | default | what it does |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        cli = [c for c in o.commands if c != PYTEST]
        flags = f"`{o.short}`, " * bool(o.short) + f"`{o.flag('run')}`"
        rows.append(f"| {o.name} | {flags} ({', '.join(cli)}) | "
                    f"{f'`{o.flag(PYTEST)}`' if PYTEST in o.commands else '-'} | "
                    f"{'' if o.default in (None, False, '', ()) else f'`{o.default}`'} | {o.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
