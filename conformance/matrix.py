"""Profiles and their expansion into cases: scenario x head config x dtype x block size x features.

A Profile names its sizes and, per case kind (kinds.KINDS), the cases of that kind: a DenseProfile
for "mha", an MLAProfile for "mla", each expanding the catalog's scenarios in its own vocabulary.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from .kinds import KINDS
from .spec import KV_LAYOUTS, SPLIT_LATENT, CaseSpec, HeadConfig, MLAHeads, Scenario, SpecError


@dataclass(frozen=True)
class MLAProfile:
    """The MLA cases of a profile: its scenarios x heads x dtypes x block sizes, each with the
    latent cache in the case's dtype and in fp8 (e4m3, one scale); some also in the split layouts."""

    kind: ClassVar[str] = "mla"

    scenarios: tuple[str, ...]
    heads: tuple[MLAHeads, ...]
    dtypes: tuple[torch.dtype, ...]
    block_sizes: tuple[int, ...]
    long_scenarios: tuple[str, ...] = ()  # first heads and block size, every dtype, latents in the dtype
    # The scenarios that run every head config (None: all); the others run the first only.
    all_heads_scenarios: tuple[str, ...] | None = None
    # In many calls (calls_cases), on the first heads and block size, latents in the dtype.
    calls_scenarios: tuple[str, ...] = ()
    calls_dtypes: tuple[torch.dtype, ...] | None = None  # None: every dtype
    # With each split latent cache (spec.SPLIT_LATENT), on the first heads, 16-bit dtypes, every block size.
    split_scenarios: tuple[str, ...] = ()
    # Sparse (CaseSpec.topk), on the first heads, every dtype, cache in the dtype, in fp8 (one scale, not 1)
    # and as fp8_ds_mla (16-bit dtypes): each of sparse_topk at each of sparse_block_sizes.
    sparse_scenarios: tuple[str, ...] = ()
    sparse_topk: tuple[int, ...] = ()
    sparse_block_sizes: tuple[int, ...] = ()

    def cases(self, scenarios: dict[str, Scenario], sizes: str) -> list[CaseSpec]:
        out = []
        for sc in scenarios.values():
            batch = sc.batch(sizes)
            if batch is None:
                continue
            if sc.name in self.scenarios:
                every = self.all_heads_scenarios is None or sc.name in self.all_heads_scenarios
                out += [CaseSpec(sc.name, batch, heads, dtype, bs, kv_dtype=kv_dtype)
                        for heads in (self.heads if every else self.heads[:1]) for dtype in self.dtypes for bs in self.block_sizes
                        for kv_dtype in ("auto", "fp8_e4m3")]
            if sc.name in self.split_scenarios:
                out += [CaseSpec(sc.name, batch, self.heads[0], dtype, bs, kv_dtype=kv_dtype)
                        for dtype in self.dtypes if dtype != torch.float32 for bs in self.block_sizes
                        for kv_dtype in SPLIT_LATENT]
            if sc.name in self.sparse_scenarios:
                out += [CaseSpec(sc.name, batch, self.heads[0], dtype, bs, kv_dtype=kv_dtype, topk=k)
                        for dtype in self.dtypes for bs in self.sparse_block_sizes for k in self.sparse_topk
                        for kv_dtype in ("auto", "fp8_e4m3", "fp8_ds_mla")
                        if kv_dtype != "fp8_ds_mla" or dtype != torch.float32]
            if sc.name in self.long_scenarios:
                out += [CaseSpec(sc.name, batch, self.heads[0], dtype, self.block_sizes[0]) for dtype in self.dtypes]
            if sc.name in self.calls_scenarios:
                out += [c for dtype in self.calls_dtypes or self.dtypes
                        for c in calls_cases(CaseSpec(sc.name, batch, self.heads[0], dtype, self.block_sizes[0]))]
        return out

    def scenario_names(self) -> set[str]:
        return set(self.scenarios + self.long_scenarios + (self.all_heads_scenarios or ()) + self.calls_scenarios
                   + self.split_scenarios + self.sparse_scenarios)


def calls_cases(base: CaseSpec, window: int | None = None) -> list[CaseSpec]:
    """`base` in many calls (CaseSpec.calls): its batch varied around each sequence; captured in a
    CUDA graph and replayed (a batch of unshared sequences; cache in the dtype and in fp8); and where
    a sequence brings more than one new token, the tokens in chunks (also with a sliding window,
    when given) and one by one."""
    out = [base.replace(calls="invariance")]
    if not base.batch.shared_prefix_lens and base.batch.batch_size >= 2:
        out += [base.replace(calls="graph"), base.replace(calls="graph", kv_dtype="fp8_e4m3")]
    if base.causal and max(base.batch.query_lens) > 1:
        out += [base.replace(calls="chunks"), base.replace(calls="tokens")]
        if window:
            out.append(base.replace(calls="chunks", sliding_window=window))
    return out


# Logits of std 2500 reach about 1e4 among a case's keys: exp() of that overflows even in float64
# unless the row's max is subtracted, and fp16 products q.k before the scale overflow too. In fp16
# and bf16 only: in fp32, where nothing overflows, the output at such logits hangs on the last bits
# of the scores (a near-tie of the two largest turns a 1e-3 summation-order difference into the
# output), which no noise estimate from one reference calibrates (seen on an H100: sdpa-math,
# triton 1.2-12x the tolerance).
EXTREME_LOGIT_STD = 2500.0


@dataclass(frozen=True)
class DenseProfile:
    """The dense ("mha") cases of a profile.

    Main grid: every scenario x head config x dtype x block size, each run plain, with a sliding
    window (causal scenarios), a logit softcap, attention sinks and an fp8 KV cache. Sweep: a few
    scenarios over more head dims and block sizes (plain cases only), so odd shapes are covered
    without multiplying the whole grid; spot heads (more GQA groups where a compile per shape makes
    the sweep dear) on the first sweep scenario and block size. Layouts: a few scenarios over the main heads, dtypes and
    block sizes with the cache in every non-default layout (plain cases), and (first heads) with
    interleaved pages. Adversarial: a few
    scenarios over the main heads, dtypes and block sizes with logits near 1e4, and (full size
    only: the caches take gigabytes) a few over the first head config with every page past 2^31
    elements, cache in the dtype and in fp8. Calls: a few scenarios on the first heads and block
    size in many calls over one cache (calls_cases).
    """

    kind: ClassVar[str] = "mha"
    heads: tuple[HeadConfig, ...]
    dtypes: tuple[torch.dtype, ...]
    block_sizes: tuple[int, ...]
    sliding_window: int
    softcap: float
    sweep_scenarios: tuple[str, ...] = ()
    sweep_heads: tuple[HeadConfig, ...] = ()
    sweep_block_sizes: tuple[int, ...] = ()
    spot_heads: tuple[HeadConfig, ...] = ()  # the first sweep scenario at the first block size only
    layout_scenarios: tuple[str, ...] = ()
    extreme_logit_scenarios: tuple[str, ...] = ()
    far_page_scenarios: tuple[str, ...] = ()
    # Long sequences (thousands of tokens), kept out of the main grid: on long_heads (cheap ones),
    # every dtype, the first block size, plain and with a sliding window.
    long_scenarios: tuple[str, ...] = ()
    long_heads: tuple[HeadConfig, ...] = ()
    # Only these scenarios of the catalog (None: all of them) in the main grid.
    scenarios: tuple[str, ...] | None = None
    # In many calls (calls_cases), on the first heads and block size, plain; and as the prompts and
    # samples of a tiny LM's rollout and rescore (CaseSpec.calls "rollout").
    calls_scenarios: tuple[str, ...] = ()
    rollout_scenarios: tuple[str, ...] = ()
    calls_dtypes: tuple[torch.dtype, ...] | None = None  # None: every dtype

    def __post_init__(self):
        distinct = set(self.heads + self.sweep_heads + self.spot_heads + self.long_heads)
        ids = sorted(h.id for h in distinct)
        if len(set(ids)) != len(ids):  # two head configs a test id could not tell apart
            raise SpecError(f"DenseProfile.heads = {ids}: head-config ids must be unique within a profile")

    def cases(self, scenarios: dict[str, Scenario], sizes: str) -> list[CaseSpec]:
        out = []
        for sc in scenarios.values():
            batch = sc.batch(sizes)
            if batch is None:
                continue
            # Many calls and rollouts, whether the main grid holds the scenario or not.
            if sc.name in self.calls_scenarios + self.rollout_scenarios:
                first = [CaseSpec(sc.name, batch, self.heads[0], dtype, self.block_sizes[0], causal=sc.causal)
                         for dtype in self.calls_dtypes or self.dtypes]
                if sc.name in self.calls_scenarios:
                    out += [c for base in first for c in calls_cases(base, self.sliding_window)]
                if sc.name in self.rollout_scenarios:
                    out += [base.replace(calls="rollout") for base in first]
            if sc.name in self.long_scenarios:
                out += [CaseSpec(sc.name, batch, heads, dtype, self.block_sizes[0], causal=sc.causal,
                                 sliding_window=window)
                        for heads in self.long_heads for dtype in self.dtypes for window in (None, self.sliding_window)]
                continue
            if self.scenarios is not None and sc.name not in self.scenarios:
                continue
            for heads in self.heads:
                for dtype in self.dtypes:
                    for bs in self.block_sizes:
                        base = CaseSpec(sc.name, batch, heads, dtype, bs, causal=sc.causal)
                        out.append(base)
                        if sc.causal:
                            out.append(base.replace(sliding_window=self.sliding_window))
                        out.append(base.replace(softcap=self.softcap))
                        out.append(base.replace(sinks=True))
                        out.append(base.replace(kv_dtype="fp8_e4m3"))
            if sc.name in self.sweep_scenarios:
                for heads in self.heads + self.sweep_heads:
                    for bs in self.block_sizes + self.sweep_block_sizes:
                        if heads in self.heads and bs in self.block_sizes:
                            continue  # in the main grid
                        out += [CaseSpec(sc.name, batch, heads, dtype, bs, causal=sc.causal) for dtype in self.dtypes]
            if self.sweep_scenarios[:1] == (sc.name,):
                out += [CaseSpec(sc.name, batch, heads, dtype, self.block_sizes[0], causal=sc.causal)
                        for heads in self.spot_heads for dtype in self.dtypes]
            if sc.name in self.layout_scenarios:
                out += [CaseSpec(sc.name, batch, heads, dtype, bs, causal=sc.causal, kv_layout=layout)
                        for heads in self.heads for dtype in self.dtypes for bs in self.block_sizes
                        for layout in KV_LAYOUTS if layout != "nhd"]
                out += [CaseSpec(sc.name, batch, self.heads[0], dtype, bs, causal=sc.causal, page_order="interleaved")
                        for dtype in self.dtypes for bs in self.block_sizes]
            if sc.name in self.extreme_logit_scenarios:
                out += [CaseSpec(sc.name, batch, heads, dtype, bs, causal=sc.causal, logit_std=EXTREME_LOGIT_STD)
                        for heads in self.heads for dtype in self.dtypes if dtype != torch.float32
                        for bs in self.block_sizes]
            if sc.name in self.far_page_scenarios:
                out += [CaseSpec(sc.name, batch, self.heads[0], dtype, bs, causal=sc.causal, kv_dtype=kv_dtype,
                                 far_pages=True)
                        for dtype in self.dtypes for bs in self.block_sizes for kv_dtype in ("auto", "fp8_e4m3")]
        return out

    def scenario_names(self) -> set[str]:
        return set(self.scenarios or ()) | set(self.sweep_scenarios + self.layout_scenarios + self.long_scenarios
                                               + self.extreme_logit_scenarios + self.far_page_scenarios
                                               + self.calls_scenarios + self.rollout_scenarios)


@dataclass(frozen=True)
class Profile:
    """One sizing of the matrix ("cpu": scenarios scaled down for CI; "gpu": full sizes) and, keyed
    by case kind, the cases of each kind (a DenseProfile for "mha", an MLAProfile for "mla")."""

    name: str
    sizes: str  # the scenarios' "cpu" (scaled down) or "gpu" (full) batch sizes
    kinds: dict[str, DenseProfile | MLAProfile]

    def __post_init__(self):
        for key, part in self.kinds.items():
            if key not in KINDS or getattr(part, "kind", None) != key:
                raise SpecError(f"Profile({self.name}).kinds[{key!r}] = {type(part).__name__}: must be keyed by "
                                f"its kind, one of {sorted(KINDS)}")

    def cases(self, scenarios: dict[str, Scenario], kind: str | None = None) -> list[CaseSpec]:
        """The cases of every kind, or of `kind` only."""
        return [c for key, part in self.kinds.items() if kind in (None, key) for c in part.cases(scenarios, self.sizes)]

    def scenario_names(self) -> set[str]:
        """Every scenario the profile names (checked against the catalog)."""
        return set().union(*(part.scenario_names() for part in self.kinds.values()))


@dataclass(frozen=True)
class Catalog:
    """What the suite runs on: the scenarios, head presets and profiles. The library receives it (the
    `conformance.fixtures` package holds the suite's own, `CATALOG`); another project can bring its own."""

    scenarios: dict[str, Scenario]
    heads: dict[str, HeadConfig | MLAHeads]
    profiles: dict[str, Profile]

    def __post_init__(self):
        for profile in self.profiles.values():
            unknown = sorted(profile.scenario_names() - set(self.scenarios))
            if unknown:
                raise SpecError(f"Profile({profile.name}) scenarios = {unknown}: not in the catalog")

    def cases(self, profile: str, scenarios: list[str] | None = None, kind: str | None = None) -> list[CaseSpec]:
        """The cases of a profile, optionally only some scenarios (names checked against the catalog)
        and one kind (CaseSpec.kind: "mha" dense or "mla" latent-cache cases)."""
        if profile not in self.profiles:
            raise SpecError(f"profile = {profile!r}: must be one of {sorted(self.profiles)}")
        if kind not in (None, *KINDS):
            raise SpecError(f"kind = {kind!r}: must be None or one of {sorted(KINDS)}")
        catalog = self.scenarios
        if scenarios:
            unknown = sorted(set(scenarios) - set(catalog))
            if unknown:
                raise SpecError(f"scenario = {unknown}: not in the catalog (known: {', '.join(catalog)})")
            catalog = {n: s for n, s in catalog.items() if n in scenarios}
        return self.profiles[profile].cases(catalog, kind)

    def scenario(self, name: str) -> Scenario:
        return _lookup("scenario", name, self.scenarios)

    def head_config(self, name: str) -> HeadConfig | MLAHeads:
        return _lookup("heads", name, self.heads)


def _lookup(field: str, name: str, known: dict):
    if name not in known:
        raise SpecError(f"{field} = {name!r}: not in the catalog (known: {', '.join(known)})")
    return known[name]


PROFILE_HELP = ("the cases: quick (every backend family and scenario kind once; the main job's default without "
                "CUDA), pr (the same reach at full sizes: a pull request's GPU tier), cpu (the full CPU profile; "
                "pytest's default without CUDA), gpu (full sizes; the default with CUDA: the nightly tier)")


def default_profile(main_job: bool = False) -> str:
    """"gpu" with CUDA; else "cpu" for pytest and "quick" for the main job (`python -m conformance run`)."""
    return "gpu" if torch.cuda.is_available() else "quick" if main_job else "cpu"


def default_device(name: str | None = None) -> torch.device:
    """`name`, else the GPU, else the CPU. With several GPUs, pytest-xdist worker gwN takes GPU N mod
    their count: workers spread over every visible GPU (several per GPU when there are more workers,
    each GPU's memory shared through its own ledger, memory.DeviceMemory)."""
    if name or not torch.cuda.is_available():
        return torch.device(name or "cpu")
    worker, gpus = os.environ.get("PYTEST_XDIST_WORKER", ""), torch.cuda.device_count()
    if worker.startswith("gw") and worker[2:].isdigit() and gpus > 1:
        return torch.device("cuda", int(worker[2:]) % gpus)
    return torch.device("cuda")


def split_names(values: list[str] | None) -> list[str] | None:
    """Repeated and/or comma-separated option values ('--backend a,b --backend c') as one list."""
    return [x for v in values for x in v.split(",") if x] if values else None
