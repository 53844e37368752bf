"""Where the blocks of a KV-cache manager (managers.py) put the model's K/V: one layout per
protocol, each a cache per layer and per request and layer the pages of its tokens."""
from __future__ import annotations

import torch

from ..managers import (KINDS_OF_LAYER, HybridBlocks, HybridManager, KVCacheManager, RefCountedBlocks,
                        RingBufferManager, RingSlots)
from ..paged import NULL_BLOCK, _allocate_cache
from ..spec import CaseSpec
from .model import LAYERS, TinyLM
from .schedule import Rollout, Step


class _Layout:
    """Where the blocks of a manager of one protocol put the model's K/V: per layer a cache and its
    block size, and per request and layer the pages of its tokens (NULL_BLOCK where it holds none).
    A manager's block b is cache page pages[b], a shuffled pick past the null page 0, so tables are
    never contiguous whatever order the manager takes blocks in. make() gives the managers their
    pools; build() makes the caches (a dry run over the schedule has none)."""

    forks = False  # whether the protocol has fork()
    caches: list | None = None

    def held(self) -> list[int]:
        """The blocks (slots) each manager holds now."""
        raise NotImplementedError

    def fork(self, parent: int, child: int) -> None:
        raise NotImplementedError

    @staticmethod
    def _pages(n: int, device, gen: torch.Generator) -> list[int]:
        return (torch.randperm(n, generator=gen, device=device) + 1).tolist()


class _Paged(_Layout):
    """Every layer's blocks from one KVCacheManager, each layer a cache of its own; the block copies
    the manager asks for (copy-on-write) are made in every layer."""

    forks = True

    def __init__(self, spec: CaseSpec, manager: KVCacheManager):
        self.spec, self.manager, self.block_sizes = spec, manager, [spec.block_size] * LAYERS

    @classmethod
    def make(cls, manager: type, spec: CaseSpec, pools) -> "_Paged":
        return cls(spec, manager(pools[0], spec.block_size))

    def build(self, poison: float, device, gen) -> None:
        n = self.manager.num_blocks
        self.caches = [_allocate_cache(self.spec, 1 + n, poison, device)[:2] for _ in range(LAYERS)]
        self.pages = self._pages(n, device, gen)

    def held(self):
        return [self.manager.num_blocks - self.manager.num_free_blocks()]

    def add(self, request, n):
        for src, dst in self.manager.allocate(request, n):
            for k, v in self.caches or ():
                k[self.pages[dst]], v[self.pages[dst]] = k[self.pages[src]], v[self.pages[src]]

    def fork(self, parent, child):
        self.manager.fork(parent, child)

    def free(self, request):
        self.manager.free(request)

    def table(self, request, layer):
        return [self.pages[b] for b in self.manager.block_table(request)]


class _Hybrid(_Layout):
    """A HybridManager's full and sliding tables. Both kinds of layer share one cache, as in vLLM's
    hybrid allocator (a block is one kind's or the other's): a sliding block given back too soon is
    overwritten by the next request that takes it."""

    def __init__(self, spec: CaseSpec, manager: HybridManager):
        self.spec, self.manager, self.block_sizes = spec, manager, [spec.block_size] * LAYERS

    @classmethod
    def make(cls, manager: type, spec: CaseSpec, pools) -> "_Hybrid":
        return cls(spec, manager(pools[0], spec.block_size, spec.sliding_window))

    def build(self, poison, device, gen):
        self.caches = [_allocate_cache(self.spec, 1 + self.manager.num_blocks, poison, device)[:2]] * LAYERS
        self.pages = self._pages(self.manager.num_blocks, device, gen)

    def held(self):
        return [self.manager.num_blocks - self.manager.num_free_blocks()]

    def add(self, request, n):
        self.manager.allocate(request, n)

    def free(self, request):
        self.manager.free(request)

    def table(self, request, layer):
        kind = KINDS_OF_LAYER[TinyLM.window_of(self.spec, layer) is not None]
        return [self.pages[b] if b >= 0 else NULL_BLOCK for b in self.manager.block_table(request, kind)]


class _Ring(_Layout):
    """Sliding layers' K/V in a RingBufferManager's slots, a cache of one-slot blocks (token p's
    table entry is its slot while the ring holds it, the null page before); full layers' blocks
    from the suite's RefCountedBlocks. A windowed rollout prefills in calls of `window` tokens, so a
    ring of 2 * window - 1 slots holds every key a call's queries see while the call writes."""

    def __init__(self, spec: CaseSpec, blocks: RefCountedBlocks, ring: RingBufferManager):
        self.spec, self.full, self.ring = spec, _Paged(spec, blocks), ring
        self.block_sizes = [1 if TinyLM.window_of(spec, layer) else spec.block_size for layer in range(LAYERS)]

    @classmethod
    def make(cls, manager: type, spec: CaseSpec, pools) -> "_Ring":
        return cls(spec, RefCountedBlocks(pools[0], spec.block_size), manager(pools[1], 2 * spec.sliding_window - 1))

    def build(self, poison, device, gen):
        self.full.build(poison, device, gen)
        ring = _allocate_cache(self.spec.replace(block_size=1), 1 + self.ring.num_slots, poison, device)[:2]
        self.caches = [ring if TinyLM.window_of(self.spec, layer) else self.full.caches[layer]
                       for layer in range(LAYERS)]
        self.pages = self._pages(self.ring.num_slots, device, gen)

    def held(self):
        return self.full.held() + [self.ring.num_slots - self.ring.num_free_slots()]

    def add(self, request, n):
        self.full.add(request, n)
        self.ring.append(request, n)

    def free(self, request):
        self.full.free(request)
        self.ring.release(request)

    def table(self, request, layer):
        if not TinyLM.window_of(self.spec, layer):
            return self.full.table(request, layer)
        window = self.ring.window_slots(request)
        return [NULL_BLOCK] * (self.ring.position(request) - len(window)) + [self.pages[s] for s in window]


_LAYOUTS = {KVCacheManager: (_Paged, RefCountedBlocks), HybridManager: (_Hybrid, HybridBlocks),
            RingBufferManager: (_Ring, RingSlots)}
_LARGE_POOL = 1 << 14


def check_manager(manager: type, spec: CaseSpec) -> type:
    """The protocol of `manager` (managers.py), which must be able to hand out the blocks of the
    rollout `spec`: raises ValueError (a usage error, not the backend's) when it cannot."""
    protocol = next((p for p in _LAYOUTS if isinstance(manager, type) and issubclass(manager, p)), None)
    if protocol is None:
        raise ValueError(f"manager = {manager!r}: must be a subclass of one of "
                         f"{', '.join(p.__name__ for p in _LAYOUTS)}")
    if protocol is not KVCacheManager and spec.sliding_window is None:
        raise ValueError(f"CaseSpec.sliding_window = None: a {protocol.__name__} ({manager.name}) hands out the "
                         f"blocks of a rollout with a sliding window only (its model's sliding layers)")
    if Rollout.of(spec.batch).forked and not _LAYOUTS[protocol][0].forks:
        raise ValueError(f"CaseSpec.batch.shared_prefix_lens = {spec.batch.shared_prefix_lens}: a {protocol.__name__} "
                         f"({manager.name}) has no fork; its rollout needs a batch without shared prompts")
    return protocol


def layout(manager: type, spec: CaseSpec, schedule: list) -> _Layout:
    """The layout of `manager`'s blocks for a rollout's schedule, its pools as large as the most
    blocks the suite's own manager of that protocol holds at once over it (so that freed blocks
    come back into use soon)."""
    cls, reference = _LAYOUTS[check_manager(manager, spec)]
    dry = cls.make(reference, spec, (_LARGE_POOL, _LARGE_POOL))
    peak = dry.held()
    for op in schedule:
        if not isinstance(op, Step):
            getattr(dry, op[0])(*op[1:])
            peak = [max(a, b) for a, b in zip(peak, dry.held())]
    return cls.make(manager, spec, peak)
