"""KV-cache managers: the half of a paged KV backend that hands out the blocks.

A manager adapter wraps an engine's block manager behind one small protocol, what vLLM's v1
KVCacheManager / BlockPool, SGLang's token-to-KV allocator and a GRPO rollout's block manager have in
common: room for a request's next tokens (admitting it on its first call), a fork that shares a
request's blocks with a new one, freeing a request, its block table, the free blocks and a block's
reference count. Blocks are ids 0..num_blocks-1 of `block_size` token slots each; token p of a
request lives in slot p % block_size of block block_table[p // block_size]. Sliding-window layers
keep only a request's last `window` tokens: their managers (RingBufferManager) hand out rings of
slots that wrap around; a HybridManager keeps a model's full-attention and sliding-window layers
in one pool, each kind with its own tables.

Adapters register like attention backends: the built-in ones in `backends/kv_managers.py` (the
`backends` package imports it), other packages' through the entry-point group below.
`conformance.manager_checks` tests them. RefCountedBlocks, the suite's own manager, is also what
the rollout cases (rollout.py) hand out their blocks with unless told otherwise.
"""
from __future__ import annotations

import importlib
from collections import deque
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "attention_conformance.managers"


class OutOfBlocks(Exception):
    """Raised by allocate() when the free blocks do not cover the request: nothing may have changed."""


class _Adapter:
    """What the manager protocols below share: a name, a description, and whether it runs here.
    Subclasses of a protocol set `name` and implement every method of it; request ids are ints."""

    name: str = ""
    description: str = ""

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this manager cannot run on this machine (its library is missing ...), or None."""
        return None

    def __repr__(self) -> str:
        protocol = next(p for p in PROTOCOLS if isinstance(self, p))
        return f"<{protocol.__name__} {self.name}>"


class KVCacheManager(_Adapter):
    """Base class of paged manager adapters, made fresh for each test as cls(num_blocks, block_size)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size

    def allocate(self, request: int, num_tokens: int) -> list[tuple[int, int]]:
        """Room for `num_tokens` (>= 1) more tokens of `request`, admitting it if new. Returns the
        block copies (src, dst) the engine must make before it writes them: a block that other
        requests share (a forked prompt's partial last block) is never written, it is copied first
        (copy-on-write) and the request's table then holds the copy. Raises OutOfBlocks, changing
        nothing, if the free blocks do not cover the new blocks and copies."""
        raise NotImplementedError

    def fork(self, parent: int, child: int) -> None:
        """A new request `child` holding `parent`'s tokens: the same blocks, shared (reference
        counts up), until one of them writes into a shared one (allocate copies it then)."""
        raise NotImplementedError

    def free(self, request: int) -> None:
        """The request is done (finished or aborted): each of its blocks loses a reference, and a
        block nobody references any more is free again."""
        raise NotImplementedError

    def block_table(self, request: int) -> list[int]:
        """The request's blocks in token order: ceil(tokens / block_size) of them."""
        raise NotImplementedError

    def num_free_blocks(self) -> int:
        raise NotImplementedError

    def ref_count(self, block: int) -> int:
        """How many requests hold `block` (0: free)."""
        raise NotImplementedError


class RefCountedBlocks(KVCacheManager):
    """The reference manager: a free list, a reference count per block, forks that share blocks,
    copy-on-write of a shared block before a write."""

    name = "reference"
    description = "our reference block manager: free list, reference counts, copy-on-write"

    def __init__(self, num_blocks: int, block_size: int):
        super().__init__(num_blocks, block_size)
        self._free = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._tokens: dict[int, int] = {}

    def allocate(self, request, num_tokens):
        if num_tokens < 1:
            raise ValueError(f"allocate(num_tokens={num_tokens}): must be >= 1")
        table, held = self._tables.get(request, []), self._tokens.get(request, 0)
        new_blocks, copy = self._needed(request, num_tokens)
        if new_blocks + copy > len(self._free):
            raise OutOfBlocks(f"request {request} needs {new_blocks + copy} blocks for {num_tokens} tokens; "
                              f"{len(self._free)} free")
        copies = []
        if copy:
            dst = self._take()
            copies.append((table[-1], dst))
            self._release(table[-1])
            table[-1] = dst
        table += [self._take() for _ in range(new_blocks)]
        self._tables[request], self._tokens[request] = table, held + num_tokens
        return copies

    def _needed(self, request: int, num_tokens: int) -> tuple[int, bool]:
        """The new blocks `num_tokens` more tokens of `request` take, and whether its last block must
        be copied first (the next token goes into it unless it is full: copied if shared)."""
        table, held = self._tables.get(request, []), self._tokens.get(request, 0)
        copy = held % self.block_size != 0 and self._refs[table[-1]] > 1
        return -(-(held + num_tokens) // self.block_size) - len(table), copy

    def fork(self, parent, child):
        if child in self._tables:
            raise ValueError(f"fork(child={child}): already a request")
        self._tables[child] = list(self._tables[parent])
        self._tokens[child] = self._tokens[parent]
        for block in self._tables[child]:
            self._refs[block] += 1

    def free(self, request):
        for block in self._tables.pop(request):
            self._release(block)
        del self._tokens[request]

    def block_table(self, request):
        return list(self._tables[request])

    def num_free_blocks(self):
        return len(self._free)

    def ref_count(self, block):
        return self._refs[block]

    def _take(self) -> int:
        block = self._free.popleft()
        self._refs[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)


class RingBufferManager(_Adapter):
    """Base class of sliding-window manager adapters (a layer that attends only its last `window`
    tokens): each request holds a ring of at most `window` slots of a pool of `num_slots`; token p
    sits in ring slot p % window, so the last `window` tokens are always there and older ones are
    overwritten. Made fresh for each test, `cls(num_slots, window)`."""

    def __init__(self, num_slots: int, window: int):
        self.num_slots, self.window = num_slots, window

    def append(self, request: int, num_tokens: int) -> list[int]:
        """The slots of the request's next `num_tokens` (>= 1) tokens, in order, admitting it if new
        (a new request starts at position 0). Raises OutOfBlocks, changing nothing, when its ring
        must grow past the free slots."""
        raise NotImplementedError

    def window_slots(self, request: int) -> list[int]:
        """The slots of its last min(tokens, window) tokens, oldest first: what attention reads."""
        raise NotImplementedError

    def position(self, request: int) -> int:
        """Tokens appended to the request so far (the next token's position)."""
        raise NotImplementedError

    def release(self, request: int) -> None:
        """The request ended: its slots are free."""
        raise NotImplementedError

    def num_free_slots(self) -> int:
        raise NotImplementedError


class RingSlots(RingBufferManager):
    """The reference ring buffer: a ring grows slot by slot up to the window, then wraps."""

    name = "reference-ring"
    description = "our reference sliding-window ring buffer: rings of up to `window` slots from a free list"

    def __init__(self, num_slots: int, window: int):
        super().__init__(num_slots, window)
        self._free = deque(range(num_slots))
        self._rings: dict[int, list[int]] = {}
        self._tokens: dict[int, int] = {}

    def append(self, request, num_tokens):
        ring, held = self._rings.get(request, []), self._tokens.get(request, 0)
        grow = min(held + num_tokens, self.window) - len(ring)
        if grow > len(self._free):
            raise OutOfBlocks(f"request {request} needs {grow} more ring slots; {len(self._free)} free")
        ring += [self._free.popleft() for _ in range(grow)]
        self._rings[request], self._tokens[request] = ring, held + num_tokens
        return [ring[p % self.window] for p in range(held, held + num_tokens)]

    def window_slots(self, request):
        ring, n = self._rings[request], self._tokens[request]
        return [ring[p % self.window] for p in range(max(0, n - self.window), n)]

    def position(self, request):
        return self._tokens[request]

    def release(self, request):
        self._free.extend(self._rings.pop(request))
        del self._tokens[request]

    def num_free_slots(self):
        return len(self._free)


KINDS_OF_LAYER = ("full", "sliding")


class HybridManager(_Adapter):
    """Base class of hybrid manager adapters, for a model whose layers are full attention or sliding
    window (Gemma 2 and 3, gpt-oss): per request one block table for the full layers (every token)
    and one for the sliding layers, from one pool of `num_blocks` blocks of `block_size` slots. A
    sliding layer's query at position p sees keys p - window + 1 .. p, so before a step from
    `computed` tokens, blocks wholly before key computed - window + 1 are of no use: they go back to
    the pool and their entries read -1 (vLLM's hybrid allocator frees them the same way). Made as
    cls(num_blocks, block_size, window)."""

    def __init__(self, num_blocks: int, block_size: int, window: int):
        self.num_blocks, self.block_size, self.window = num_blocks, block_size, window

    def allocate(self, request: int, num_tokens: int) -> None:
        """Room for the request's next `num_tokens` (>= 1) tokens in both tables, admitting it if
        new, after freeing the sliding blocks the step cannot see. Raises OutOfBlocks, changing
        nothing, when the free blocks (those freed by this step included) do not cover it."""
        raise NotImplementedError

    def block_table(self, request: int, kind: str) -> list[int]:
        """Its blocks for the layers of `kind` ("full" or "sliding"), ceil(tokens / block_size)
        entries in token order; -1 for a sliding block already given back."""
        raise NotImplementedError

    def budget(self, computed: int, new: int) -> dict[str, int]:
        """The blocks a request holds in each kind of layer after a step of `new` tokens over
        `computed` ones: what the engine plans memory with."""
        raise NotImplementedError

    def free(self, request: int) -> None:
        raise NotImplementedError

    def num_free_blocks(self) -> int:
        raise NotImplementedError


class HybridBlocks(HybridManager):
    """The reference hybrid manager: one free list, a full and a sliding table per request."""

    name = "reference-hybrid"
    description = "our reference hybrid manager: full-layer and sliding-layer tables from one pool"

    def __init__(self, num_blocks: int, block_size: int, window: int):
        super().__init__(num_blocks, block_size, window)
        self._free = deque(range(num_blocks))
        self._tables: dict[int, dict[str, list[int]]] = {}
        self._tokens: dict[int, int] = {}

    def budget(self, computed, new):
        blocks = -(-(computed + new) // self.block_size)
        return {"full": blocks, "sliding": blocks - self._unseen(computed)}

    def _unseen(self, computed: int) -> int:
        """Sliding blocks wholly before the first key the step's first query sees."""
        return max(0, computed - self.window + 1) // self.block_size

    def allocate(self, request, num_tokens):
        computed = self._tokens.get(request, 0)
        tables = self._tables.get(request, {"full": [], "sliding": []})
        blocks = -(-(computed + num_tokens) // self.block_size)
        sliding = tables["sliding"]
        gone = [i for i in range(min(self._unseen(computed), len(sliding))) if sliding[i] != -1]
        need = 2 * blocks - len(tables["full"]) - len(sliding)
        if need > len(self._free) + len(gone):
            raise OutOfBlocks(f"request {request} needs {need} blocks; {len(self._free)} free, {len(gone)} to be freed")
        for i in gone:
            self._free.append(sliding[i])
            sliding[i] = -1
        for kind in KINDS_OF_LAYER:
            tables[kind] += [self._free.popleft() for _ in range(blocks - len(tables[kind]))]
        self._tables[request], self._tokens[request] = tables, computed + num_tokens

    def block_table(self, request, kind):
        return list(self._tables[request][kind])

    def free(self, request):
        tables = self._tables.pop(request)
        self._free.extend(b for kind in KINDS_OF_LAYER for b in tables[kind] if b != -1)
        del self._tokens[request]

    def num_free_blocks(self):
        return len(self._free)


PROTOCOLS = (KVCacheManager, RingBufferManager, HybridManager)
_MANAGERS: dict[str, type] = {}
_loaded = False


def register_manager(cls):
    """Register a manager adapter (a subclass of one of PROTOCOLS; usable as a class decorator).
    Returns it unchanged."""
    if not (isinstance(cls, type) and issubclass(cls, PROTOCOLS)):
        raise ValueError(f"register_manager({cls!r}): must be a subclass of one of "
                         f"{', '.join(p.__name__ for p in PROTOCOLS)}")
    if not cls.name or not all(c.isalnum() or c in "-_" for c in cls.name):
        raise ValueError(f"manager name = {cls.name!r}: must be non-empty, letters, digits, '-' and '_' only")
    other = _MANAGERS.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"manager name = {cls.name!r}: already registered by {other.__qualname__}")
    _MANAGERS[cls.name] = cls
    return cls


def load_managers(modules: tuple[str, ...] = ()) -> dict[str, type]:
    """The registered managers, after those of installed packages (entry points) and `modules`
    (the built-in ones register when the `backends` package is imported). A plugin that fails to
    load raises: a manager test must not silently shrink."""
    global _loaded
    if not _loaded:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, PROTOCOLS):
                register_manager(obj)
        _loaded = True
    for module in modules:
        importlib.import_module(module)
    return dict(_MANAGERS)
