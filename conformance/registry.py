"""Backends: the adapter interface, their declared capabilities, and the registry.

An adapter translates a Case into one library call. It never builds inputs, computes references
or judges. Adapters register when their module is imported: the built-in ones in the `backends`
package (the front ends import it), other packages' through the entry-point group below, without
editing this repo.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch

from .kinds import KINDS, kind_of
from .known import KnownFailure
from .paged import Case
from .spec import DTYPE_NAMES, KV_LAYOUTS, CaseSpec
from .tolerance import Tolerance

ENTRY_POINT_GROUP = "attention_conformance.backends"
ALL_KV_LAYOUTS = frozenset(KV_LAYOUTS)
ALL_FEATURES = frozenset({"causal", "non_causal", "sliding_window", "softcap", "sinks", "empty_sequences",
                          "sparse"})
# What Capabilities() claims unless told otherwise. Features the suite adds later (sinks, batches
# holding empty sequences) are opt-in, so an adapter written before them is not suddenly failing
# cases it never claimed.
DEFAULT_FEATURES = frozenset({"causal", "non_causal", "sliding_window", "softcap"})
# What a backend may promise to give bit for bit the same output as one call over the whole batch
# (the call modes of modes/paths.py and modes/invariance.py): the tokens brought in "chunks" or one
# by one ("tokens"), a sequence in another "batch" (reordered, halved, padded), the same call again
# ("run_to_run"). Undeclared, the difference is reported in ULPs and held to the case's tolerance.
BIT_EXACT = frozenset({"chunks", "tokens", "batch", "run_to_run"})
FP32_PRECISIONS = ("ieee", "tf32")  # Capabilities.fp32_precision


def _names(values) -> str:
    return ", ".join(sorted(DTYPE_NAMES.get(v, str(v)) for v in values))


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run. Every case outside it is skipped with the rule it breaks."""

    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    compute_capability: tuple[tuple[int, int], tuple[int, int]] | None = None  # inclusive range, CUDA only
    dtypes: frozenset[torch.dtype] = frozenset(DTYPE_NAMES)
    kv_dtypes: frozenset[str] = frozenset({"auto"})
    # Cache layouts the adapter reads and writes (spec.KV_LAYOUTS). Only "nhd" unless declared: an
    # adapter that views the cache as contiguous [slots, Hkv, D] must not meet strided ones.
    kv_layouts: frozenset[str] = frozenset({"nhd"})
    num_q_heads: frozenset[int] | None = None  # query heads of one call; None: any
    # Head shapes, in the vocabulary of the backend's kind (CaseKind.head_capabilities); None: any.
    head_dims: frozenset[int] | None = None  # dense: the head dim of q, k and v
    gqa_ratios: frozenset[int] | None = None  # dense: query heads per KV head
    latent_dims: frozenset[tuple[int, int]] | None = None  # MLA: (kv_lora_rank, qk_rope_head_dim)
    block_sizes: frozenset[int] | None = None  # None: any (subject to block_size_multiple)
    block_size_multiple: int = 1
    max_query_len: int | None = None  # new tokens of one sequence at most (1: a decode-only kernel); None: any
    features: frozenset[str] = DEFAULT_FEATURES
    returns_lse: bool = False
    bit_exact: frozenset[str] = frozenset()  # of BIT_EXACT
    # prepare_graph()'s call may be captured in a CUDA graph once and replayed on other batches of
    # the same shape (the "graph" call mode); replays pad with empty sequences, so it needs those.
    cuda_graphs: bool = False
    requires: tuple[str, ...] = ()  # importable modules; a missing one skips every case, naming it
    # The precision of the matmuls (Q.K, P.V) on fp32 inputs (FP32_PRECISIONS): "ieee", true fp32 products (the
    # default, judged as fp32); "tf32", operands cut to TF32's 10-bit mantissa (Triton's default tl.dot, cuBLAS
    # with allow_tf32), judged against a reference that does the same. fp16/bf16 inputs multiply exactly.
    fp32_precision: str = "ieee"
    # For the GPU memory estimate (memory.call_bytes): how many copies of the whole paged cache a call
    # makes at most beyond what the harness holds (a padded copy of K and V counts one; a gather of the
    # sequences' tokens none, the harness counts that). 0 for a kernel that reads the pages in place. The
    # default assumes an adapter that gathers, pads and converts; a lower declaration lets more big cases
    # share the GPU at once.
    cache_copies: float = 4.0

    def unsupported(self, spec: CaseSpec, device: torch.device) -> str | None:
        """Every rule that keeps this backend from running `spec` on `device` ("; "-joined), or None."""
        unmet = []
        if device.type not in self.devices:
            unmet.append(f"device {device.type} not supported (supports: {', '.join(sorted(self.devices))})")
        if self.compute_capability and device.type == "cuda":
            cc = torch.cuda.get_device_capability(device)
            lo, hi = self.compute_capability
            if not lo <= cc <= hi:
                unmet.append(f"compute capability sm_{cc[0]}{cc[1]} outside sm_{lo[0]}{lo[1]}..sm_{hi[0]}{hi[1]}")
        if spec.dtype not in self.dtypes:
            unmet.append(f"dtype {spec.dtype_name} not supported (supports: {_names(self.dtypes)})")
        if spec.kv_dtype not in self.kv_dtypes:
            unmet.append(f"kv dtype {spec.kv_dtype} not supported (supports: {', '.join(sorted(self.kv_dtypes))})")
        if spec.kv_layout not in self.kv_layouts:
            unmet.append(f"kv layout {spec.kv_layout} not supported (supports: {', '.join(sorted(self.kv_layouts))})")
        if self.num_q_heads is not None and spec.heads.num_q_heads not in self.num_q_heads:
            unmet.append(f"{spec.heads.num_q_heads} query heads not supported (supports: {sorted(self.num_q_heads)})")
        unmet += kind_of(spec).head_rules(self, spec.heads)
        if self.block_sizes is not None and spec.block_size not in self.block_sizes:
            unmet.append(f"block size {spec.block_size} not supported (supports: {sorted(self.block_sizes)})")
        if spec.block_size % self.block_size_multiple:
            unmet.append(f"block size {spec.block_size} not a multiple of {self.block_size_multiple}")
        longest = max(spec.batch.query_lens)
        if self.max_query_len is not None and longest > self.max_query_len:
            unmet.append(f"{longest} new tokens in a sequence; at most {self.max_query_len} (max_query_len)")
        missing = sorted(spec.features - self.features)
        if missing:
            unmet.append(f"feature {', '.join(missing)} not supported")
        return "; ".join(unmet) or None


class Unsupported(Exception):
    """Raised by an adapter's run() when its library refuses the input at call time (a dispatcher
    that finds no kernel for a shape): the case is a SKIP with this reason, counted and shown like
    any other. Use the Capabilities or unsupported() for every rule known before the call."""


class Backend:
    """Base class of adapters. Subclasses set `name` and `capabilities` and implement run()."""

    name: str = ""
    description: str = ""
    kind: str = "mha"  # the cases it runs (CaseSpec.kind): dense attention; MLABackend says "mla"
    capabilities: Capabilities = Capabilities()
    tolerance: Tolerance | None = None  # an override of the pass rule, with its reason
    finite_poison: bool = False  # the kernel masks by multiplying with 0, so NaN poison would leak
    known_failures: tuple[KnownFailure, ...] = ()  # pairs it is known to fail, with their issue (known.py)

    def unavailable(self) -> str | None:
        """Why this backend cannot run at all on this machine (missing library ...), or None. Asked
        once per backend object (skip_reason keeps the answer), so an expensive check needs no cache."""
        for module in self.capabilities.requires:
            if importlib.util.find_spec(module.split(".")[0]) is None:
                return f"{module} is not installed"
        return None

    def unsupported(self, spec: CaseSpec, device: torch.device) -> str | None:
        """Extra per-case rules beyond Capabilities; override to add them (return the reason)."""
        return None

    def skip_reason(self, spec: CaseSpec, device: torch.device, captured: bool = False) -> str | None:
        """Why this backend does not run `spec` here: the kind, its absence, or every unmet rule
        (the Capabilities' and unsupported()'s together, so one reason tells the whole story; with
        `captured`, as a call captured in a CUDA graph and replayed: graph_unsupported()'s too)."""
        if spec.kind != self.kind:
            return f"an {spec.kind} case; {self.name} runs {self.kind} cases"
        if "_unavailable" not in vars(self):  # asked once per backend: it is about the machine, not the case
            self._unavailable = self.unavailable()
        if self._unavailable:  # its rules may need what is missing
            return self._unavailable
        unmet = [self.capabilities.unsupported(spec, device), self.unsupported(spec, device)]
        if captured:
            unmet.append(self.graph_unsupported(spec, device) if self.capabilities.cuda_graphs
                         else "no CUDA-graph replay (Capabilities.cuda_graphs)")
        return "; ".join(r for r in unmet if r) or None

    def graph_unsupported(self, spec: CaseSpec, device: torch.device) -> str | None:
        """Extra rules for a call captured in a CUDA graph and replayed (Capabilities.cuda_graphs),
        asked of each batch the graph meets, beside unsupported()'s; override to add them."""
        return None

    def compile_key(self, spec: CaseSpec):
        """For a library that compiles a kernel per variant on first use: what selects the variant
        `spec` needs (any hashable), so a warm-up builds each once before the run. None: nothing to build."""
        return None

    def write_cache(self, case: Case) -> None:
        """Write the new tokens' K/V (an MLA case: latents) into the paged cache, as the case's kind
        does by default (scatter_to_cache, scatter_latent). Override with the library's own op."""
        kind_of(case.spec).write_cache(case)

    def run(self, case: Case):
        """Return out [T, Hq, D] in the case's dtype, or (out, lse) with lse [T, Hq] in natural log
        (with sinks, the sink is in it: log(sum(exp(logits)) + exp(sink)))."""
        return self.prepare(case)()

    def prepare(self, case: Case):
        """The call that runs the kernel on `case`, with the per-batch work (plans, metadata) done
        before it: benchmarks time the returned call. Override either this or run()."""
        if type(self).run is Backend.run:
            raise NotImplementedError(f"{type(self).__name__} must implement run() or prepare()")
        return lambda: self.run(case)

    def prepare_graph(self, case: Case):
        """For CUDA-graph replay (Capabilities.cuda_graphs): (call, plan). The harness runs plan(),
        captures call() once on `case`, and before each replay writes the next batch into the case's
        tensors in place (graphs.load) and runs plan() again. So call() must read the batch from
        the tensors (a Python value of the case is the captured batch's, a bound of every replay),
        and plan() does the per-batch host work into buffers that call() reads. Token rows past
        query_start_loc[-1] are padding: their output is never read. Default: prepare(case), no plan."""
        return self.prepare(case), lambda: None

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


class MLABackend(Backend):
    """Base class of MLA adapters: run(case) gets an MLACase (q [T, H, P + R], the paged latent
    cache [num_blocks, block_size, L + R], W_UK, W_UV) and returns out [T, H, V] in the case's
    dtype, or (out, lse). The default write_cache stores [kv_c, k_pe] of the new tokens."""

    kind = "mla"
    capabilities = Capabilities(features=frozenset({"causal"}))


class RegistryError(ValueError):
    pass


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend):
    """Register a Backend subclass (usable as a class decorator) or instance. Returns it unchanged."""
    instance = backend() if isinstance(backend, type) else backend
    if not isinstance(instance, Backend):
        raise RegistryError(f"register_backend({backend!r}): must be a Backend subclass or instance")
    name = instance.name
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise RegistryError(f"backend name = {name!r}: must be non-empty, letters, digits, '-' and '_' only")
    other = _REGISTRY.get(name)
    if other is not None and type(other) is not type(instance):
        raise RegistryError(f"backend name = {name!r}: already registered by {type(other).__qualname__}")
    _check_vocabulary(instance)
    _REGISTRY[name] = instance
    return backend


def _check_vocabulary(backend: Backend) -> None:
    """A backend's declarations hold together: its kind exists, its bit_exact names are known, CUDA
    graphs come with empty sequences, and its head rules are in its kind's vocabulary (a dense rule
    on an MLA backend, a GQA ratio say, would silently mean something else or nothing)."""
    if backend.kind not in KINDS:
        raise RegistryError(f"{backend.name}.kind = {backend.kind!r}: must be one of {sorted(KINDS)}")
    unknown = sorted(set(backend.capabilities.bit_exact) - BIT_EXACT)
    if unknown:
        raise RegistryError(f"{backend.name}: Capabilities.bit_exact = {sorted(backend.capabilities.bit_exact)}: "
                            f"{unknown} unknown; must be some of {sorted(BIT_EXACT)}")
    if not all(isinstance(k, KnownFailure) for k in backend.known_failures):
        raise RegistryError(f"{backend.name}.known_failures = {backend.known_failures!r}: must be a tuple of "
                            f"conformance.KnownFailure")
    caps = backend.capabilities
    if caps.fp32_precision not in FP32_PRECISIONS:
        raise RegistryError(f"{backend.name}: Capabilities.fp32_precision = {caps.fp32_precision!r}: must be one of "
                            f"{', '.join(FP32_PRECISIONS)} (the precision its matmuls run at on fp32 inputs)")
    if caps.cuda_graphs and "empty_sequences" not in caps.features:
        raise RegistryError(f"{backend.name}: Capabilities.cuda_graphs needs 'empty_sequences' in features (a graph "
                            f"is replayed on batches padded with empty sequences); features = {sorted(caps.features)}")
    own = KINDS[backend.kind].head_capabilities
    for kind in KINDS.values():
        for field in set(kind.head_capabilities) - set(own):
            if getattr(backend.capabilities, field) is not None:
                raise RegistryError(f"{backend.name}: Capabilities.{field} = {getattr(backend.capabilities, field)} "
                                    f"is a rule of {kind.name} cases; a {backend.kind} backend's head rules are "
                                    f"{', '.join(('num_q_heads',) + own)}")


class _BrokenPlugin(Backend):
    """Stands in for an entry point that failed to load, so the failure shows as ERROR, not silence."""

    def __init__(self, name: str, error: str):
        self.name, self.error = name, error
        self.description = f"entry point failed to load: {error}"

    def run(self, case: Case):
        raise RegistryError(f"plugin {self.name!r} failed to load: {self.error}")


_loaded = False


def load_backends(modules: tuple[str, ...] = ()) -> dict[str, Backend]:
    """The registered backends, after importing those of installed packages (entry points) and `modules`."""
    global _loaded
    if not _loaded:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                if isinstance(obj, Backend) or (isinstance(obj, type) and issubclass(obj, Backend)):
                    register_backend(obj)
                elif callable(obj):
                    obj()  # a function that registers its backends
            except Exception as e:  # noqa: BLE001 - any plugin failure must be visible, not fatal
                register_backend(_BrokenPlugin(ep.name, f"{type(e).__name__}: {e}"))
        _loaded = True
    for module in modules:
        importlib.import_module(module)
    return dict(_REGISTRY)


def get_backend(name: str) -> Backend:
    backends = load_backends()
    if name not in backends:
        raise RegistryError(f"backend = {name!r}: not registered (registered: {', '.join(sorted(backends))})")
    return backends[name]


def select_backends(names: list[str] | None, modules: tuple[str, ...] = ()) -> list[Backend]:
    """The backends a run asked for (all registered when `names` is empty), unknown names refused."""
    backends = load_backends(modules)
    names = names or sorted(backends)
    unknown = [n for n in names if n not in backends]
    if unknown:
        raise RegistryError(f"backend = {unknown}: not registered (registered: {', '.join(sorted(backends))})")
    return [backends[n] for n in names]
