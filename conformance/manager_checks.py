"""The contract of a KV-cache manager (managers.py), as a hypothesis rule-based state machine.

Random interleavings of admit, append, fork, finish, abort and exhaustion run against a manager and
a model of what the engine wrote where: each written token gets an id, stored in a simulated cache
at the slot the manager's block table gives it (block copies the manager asks for are made first).
After every step:

- every request's table holds ceil(tokens / block_size) distinct blocks, in range; a fork's child
  holds its parent's full blocks themselves (shared, not copied);
- a block's reference count equals the requests that hold it; free + held = all blocks;
- every token of every request reads back what was written for it, through its table (a block
  handed out twice, freed too early or written while shared shows here, as attention would see it);
- a write goes only into a block its request holds alone (a shared partial block is copied first);
- a step changes no table but its own request's, and that one only by new blocks and the copy of a
  shared partial last block: nothing else is un-shared, copied or moved (a fork leaves its parent
  as it was, a free every other request);
- an allocation that raises OutOfBlocks changed nothing, and the free blocks really did not cover
  its new blocks and copies (a manager that refuses with room to spare starves the engine);
- and when every request has ended (a step of its own), every block is free.

Sliding-window ring buffers (RingBufferManager) and hybrid managers (HybridManager) have contracts of
their own (ring_contract, hybrid_contract).

Runs are derandomized (the same examples on every run), and hypothesis shrinks a failure to a short
sequence of steps that it prints as a script (`state = ...; state.admit(n=5) ...`) to replay it.
How many runs and steps: the settings profile, "conformance" (the default) or
"conformance-nightly" (PROFILES; pytest --hypothesis-profile=conformance-nightly).
"""
from __future__ import annotations

from collections import Counter

from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule

from .managers import KINDS_OF_LAYER, HybridManager, KVCacheManager, OutOfBlocks, RingBufferManager

NUM_BLOCKS, BLOCK_SIZE = 12, 4  # a pool of 48 slots: exhaustion comes within a few steps
NUM_SLOTS, WINDOW = 24, 5  # ring buffers: rings of 5 slots, up to 4 at once
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)  # no "explain": slow, and the steps say it
PROFILES = {
    "conformance": settings(max_examples=300, stateful_step_count=50, deadline=None, derandomize=True, phases=_PHASES),
    "conformance-nightly": settings(max_examples=5000, stateful_step_count=100, deadline=None, derandomize=True,
                                    phases=_PHASES),
}


REQUESTS = Bundle("requests")  # the request ids every contract's rules draw from
EXHAUSTED = object()  # what _unless_exhausted returns when the manager ran out


def _requests(max_admit: int, max_append: int):
    """The base of every contract's state machine: what it does to requests. Admit one with up to
    `max_admit` tokens, grow one by up to `max_append`, end one, end them all (then the whole pool
    must be free). A subclass sets `pool` and `unit` (the manager's size, "blocks" or "slots") and
    says what growing (_grow -> False when exhausted) and ending (_end) a request does, how many
    units are free (_free_units) and what the manager's state reads (_state: a dict compared around
    an exhausted call)."""

    class Requests(RuleBasedStateMachine):
        pool: int
        unit: str

        def __init__(self):
            super().__init__()
            self.tokens: dict[int, list[int]] = {}  # request -> the ids of the tokens it holds, in order
            self.ids = iter(range(10**9))  # fresh request and token ids

        @rule(target=REQUESTS, n=st.integers(1, max_admit))
        def admit(self, n):
            request = next(self.ids)
            return request if self._grow(request, n) else multiple()

        # A request that ended (in end_all) may still be drawn: then the step does nothing.
        @rule(request=REQUESTS, n=st.integers(1, max_append))
        def append(self, request, n):
            if request in self.tokens:
                self._grow(request, n)

        @rule(request=consumes(REQUESTS))
        def finish(self, request):
            if request in self.tokens:
                self._end(request)

        @rule()
        def end_all(self):
            """Every request ends: the whole pool must be free again."""
            for r in list(self.tokens):
                self._end(r)
            free = self._free_units()
            assert free == self.pool, f"every request freed, but {free} of {self.pool} {self.unit} are free"

        def _unless_exhausted(self, what: str, call):
            """What call() returns, or EXHAUSTED when it raised OutOfBlocks, which must have changed nothing."""
            before = self._state()
            try:
                return call()
            except OutOfBlocks:
                after = self._state()
                changes = "; ".join(f"{k}: {v} -> {after[k]}" for k, v in before.items() if after[k] != v)
                assert not changes, f"{what} raised OutOfBlocks but changed the manager: {changes}"
                return EXHAUSTED

    return Requests


def contract(manager: type[KVCacheManager], num_blocks: int = NUM_BLOCKS, block_size: int = BLOCK_SIZE):
    """The state machine (a RuleBasedStateMachine subclass) that holds `manager` to the contract;
    run it with hypothesis.stateful.run_state_machine_as_test."""
    bs = block_size

    class ManagerContract(_requests(max_admit=3 * bs, max_append=2 * bs)):
        pool, unit = num_blocks, "blocks"

        def __init__(self):
            super().__init__()
            self.manager = manager(num_blocks, block_size)
            self.cache: dict[tuple[int, int], int] = {}  # (block, slot) -> the token id last written there

        @rule(target=REQUESTS, parent=REQUESTS)
        def fork(self, parent):
            if parent not in self.tokens:
                return multiple()
            child = next(self.ids)
            before = self._tables()
            self.manager.fork(parent, child)
            self._kept(f"fork({parent}, {child})", before, child)
            self.tokens[child] = list(self.tokens[parent])
            full = len(self.tokens[parent]) // bs
            mine, theirs = self.manager.block_table(child)[:full], self.manager.block_table(parent)[:full]
            assert mine == theirs, \
                f"fork({parent}, {child}): the child's full blocks {mine} are not the parent's {theirs}"
            return child

        @rule(request=consumes(REQUESTS), n=st.integers(1, 2 * bs))
        def abort(self, request, n):
            """Freed in the middle of a step: its new blocks allocated, nothing written yet."""
            if request in self.tokens:
                self._allocate(request, n)
                self._end(request)

        @invariant()
        def every_block_is_accounted_for(self):
            tables = {r: self.manager.block_table(r) for r in self.tokens}
            holders = Counter(b for t in tables.values() for b in t)
            for r, t in tables.items():
                want = -(-len(self.tokens[r]) // bs)
                assert len(t) == want, f"request {r}: {len(t)} blocks for {len(self.tokens[r])} tokens (must be {want})"
                assert len(set(t)) == len(t), f"request {r}'s block table holds a block twice: {t}"
                assert all(0 <= b < num_blocks for b in t), \
                    f"request {r}'s block table {t}: ids must be 0..{num_blocks - 1}"
            for b in range(num_blocks):
                refs = self.manager.ref_count(b)
                assert refs == holders[b], f"block {b}: ref_count {refs}, but {holders[b]} requests hold it"
            free = self.manager.num_free_blocks()
            assert free + len(holders) == num_blocks, f"{free} free + {len(holders)} held blocks != {num_blocks}"

        @invariant()
        def every_token_reads_back(self):
            for r, held in self.tokens.items():
                table = self.manager.block_table(r)
                for p, token in enumerate(held):
                    at = (table[p // bs], p % bs)
                    got = self.cache.get(at)
                    assert got == token, (f"request {r} token {p} reads token {got} from block {at[0]} slot {at[1]}, "
                                          f"not its own ({token})")

        def _allocate(self, request: int, n: int) -> bool:
            """The manager's allocate, its copies made in the cache; False when it ran out of blocks."""
            before, free = self._tables(), self.manager.num_free_blocks()
            held, copied = len(self.tokens.get(request, ())), self._shared_partial(request, before)
            need = -(-(held + n) // bs) - len(before.get(request, [])) + copied  # new blocks and the copy
            copies = self._unless_exhausted(f"allocate({request}, {n})", lambda: self.manager.allocate(request, n))
            if copies is EXHAUSTED:
                assert free < need, (f"allocate({request}, {n}) raised OutOfBlocks with {free} free blocks; it needs "
                                     f"{need} (new blocks, and a copy of a shared partial last block)")
                return False
            stays = before.get(request, [])[:held // bs if copied else None]
            self._kept(f"allocate({request}, {n})", before, request, stays)
            for src, dst in copies:
                for slot in range(bs):
                    if (src, slot) in self.cache:
                        self.cache[dst, slot] = self.cache[src, slot]
            return True

        def _shared_partial(self, request: int, tables: dict) -> bool:
            """Whether the request's last block is partly filled and shared: its next write copies it."""
            held = len(self.tokens.get(request, ()))
            return held % bs != 0 and self.manager.ref_count(tables[request][-1]) > 1

        def _tables(self) -> dict[int, list[int]]:
            return {r: self.manager.block_table(r) for r in self.tokens}

        def _kept(self, step: str, before: dict, request: int | None = None, stays: list | None = None) -> None:
            """After `step`: every table but `request`'s as before, and `request`'s beginning with `stays`."""
            after = self._tables() | ({request: self.manager.block_table(request)} if request is not None else {})
            for r, table in before.items():
                want = table if r != request else stays
                got = after.get(r, [])[:len(want)]
                assert r not in after or got == want, (f"{step} changed request {r}'s blocks {want} to {got}: "
                                                       f"only new blocks and the copy of a shared partial last "
                                                       f"block may change, and only the step's own request's")

        def _grow(self, request: int, n: int) -> bool:
            """Room for n more tokens, then their ids into the slots the table gives them."""
            if not self._allocate(request, n):
                return False
            held = self.tokens.setdefault(request, [])
            table = self.manager.block_table(request)
            assert len(table) * bs >= len(held) + n, f"allocate({request}, {n}): {len(table)} blocks for " \
                                                     f"{len(held) + n} tokens"
            for p in range(len(held), len(held) + n):
                block = table[p // bs]
                refs = self.manager.ref_count(block)
                assert refs == 1, f"request {request} writes token {p} into block {block}, " + (
                    f"which {refs} requests hold: a shared block must be copied before a write" if refs
                    else "which is free (ref_count 0)")
                token = next(self.ids)
                self.cache[block, p % bs] = token
                held.append(token)
            return True

        def _end(self, request: int) -> None:
            before = self._tables()
            self.manager.free(request)
            del self.tokens[request]
            self._kept(f"free({request})", {r: t for r, t in before.items() if r != request})

        def _free_units(self) -> int:
            return self.manager.num_free_blocks()

        def _state(self):
            return {"free blocks": self.manager.num_free_blocks(),
                    "block tables": {r: self.manager.block_table(r) for r in self.tokens},
                    "reference counts": [self.manager.ref_count(b) for b in range(num_blocks)]}

    ManagerContract.__name__ = f"Contract_{manager.name.replace('-', '_')}"
    return ManagerContract


def ring_contract(manager: type[RingBufferManager], num_slots: int = NUM_SLOTS, window: int = WINDOW):
    """The state machine that holds a sliding-window ring-buffer manager to its contract: after
    every step each request's position is the tokens it appended, its window is its last
    min(tokens, window) tokens and reads back what was written there (the wrap-around at exactly
    the window), no slot is in two requests' windows (isolation), the free slots are the pool less
    every request's min(tokens, window) (the sliding layers' budget), an exhausted append changed
    nothing; a request admitted after others were released starts at position 0 in clean slots."""

    class RingContract(_requests(max_admit=2 * window, max_append=2 * window)):
        pool, unit = num_slots, "slots"

        def __init__(self):
            super().__init__()
            self.manager = manager(num_slots, window)
            self.slots: dict[int, int] = {}  # slot -> the token id last written there

        @invariant()
        def every_window_reads_back(self):
            held = Counter()
            for r, tokens in self.tokens.items():
                assert self.manager.position(r) == len(tokens), \
                    f"request {r}: position {self.manager.position(r)} after {len(tokens)} tokens"
                slots, want = self.manager.window_slots(r), tokens[-window:]
                assert len(slots) == len(want), \
                    f"request {r}: a window of {len(slots)} slots for its last {len(want)} tokens"
                for i, (slot, token) in enumerate(zip(slots, want)):
                    got = self.slots.get(slot)
                    assert got == token, (f"request {r} position {len(tokens) - len(want) + i} reads token {got} "
                                          f"from slot {slot}, not its own ({token})")
                held.update(slots)
            shared = sorted(s for s, n in held.items() if n > 1)
            assert not shared, f"slots {shared} are in the windows of two requests"
            free = self.manager.num_free_slots()
            assert free + sum(held.values()) == num_slots, \
                f"{free} free + {sum(held.values())} held slots != {num_slots}"

        def _grow(self, request: int, n: int) -> bool:
            slots = self._unless_exhausted(f"append({request}, {n})", lambda: self.manager.append(request, n))
            if slots is EXHAUSTED:
                return False
            assert len(slots) == n and all(0 <= s < num_slots for s in slots), \
                f"append({request}, {n}) gave slots {slots}: must be {n} of 0..{num_slots - 1}"
            tokens = self.tokens.setdefault(request, [])
            for slot in slots:
                self.slots[slot] = token = next(self.ids)
                tokens.append(token)
            return True

        def _end(self, request: int) -> None:
            self.manager.release(request)
            del self.tokens[request]

        def _free_units(self) -> int:
            return self.manager.num_free_slots()

        def _state(self):
            return {"free slots": self.manager.num_free_slots(),
                    "windows": {r: self.manager.window_slots(r) for r in self.tokens}}

    RingContract.__name__ = f"RingContract_{manager.name.replace('-', '_')}"
    return RingContract


def hybrid_contract(manager: type[HybridManager], num_blocks: int = NUM_BLOCKS, block_size: int = BLOCK_SIZE,
                    window: int = WINDOW):
    """The state machine that holds a hybrid manager (full-attention and sliding-window layers from
    one pool) to its contract: after every step each request's full table holds a block for every
    token and its sliding table -1 exactly for the blocks wholly before the window of the last
    step's first query; each kind's blocks are what budget() reported for that step (the per-layer
    budget); every token a layer can still see reads back what was written for it; no block is in
    two places; free + held = all blocks; an exhausted step changed nothing; ending every request
    frees every block."""
    bs = block_size

    class HybridContract(_requests(max_admit=3 * bs, max_append=2 * bs)):
        pool, unit = num_blocks, "blocks"

        def __init__(self):
            super().__init__()
            self.manager = manager(num_blocks, block_size, window)
            self.computed: dict[int, int] = {}  # tokens before the request's last step
            self.cache: dict[tuple[str, int, int], int] = {}  # (kind, block, slot) -> token id

        @invariant()
        def every_layer_holds_its_budget(self):
            held = Counter()
            for r, tokens in self.tokens.items():
                budget = self.manager.budget(self.computed[r], len(tokens) - self.computed[r])
                unseen = max(0, self.computed[r] - window + 1) // bs
                for kind in KINDS_OF_LAYER:
                    table = self.manager.block_table(r, kind)
                    live = [b for b in table if b != -1]
                    gone = unseen if kind == "sliding" else 0
                    shape_ok = len(table) == -(-len(tokens) // bs) and table[:gone] == [-1] * gone
                    assert shape_ok and -1 not in table[gone:], (
                        f"request {r} ({len(tokens)} tokens, its last step from {self.computed[r]}): {kind} table "
                        f"{table}; must hold a block for each {bs} tokens, -1 for the first {gone}")
                    assert budget[kind] == len(live), \
                        f"request {r}: budget() reports {budget[kind]} {kind} blocks; it holds {len(live)}"
                    assert all(0 <= b < num_blocks for b in live), \
                        f"request {r}'s {kind} table {table}: ids must be 0..{num_blocks - 1}"
                    held.update(live)
                    for p in range(gone * bs, len(tokens)):
                        got = self.cache.get((kind, table[p // bs], p % bs))
                        assert got == tokens[p], (f"request {r} {kind} token {p} reads token {got} from block "
                                                  f"{table[p // bs]}, not its own ({tokens[p]})")
            twice = sorted(b for b, n in held.items() if n > 1)
            assert not twice, f"blocks {twice} are held twice"
            free = self.manager.num_free_blocks()
            assert free + len(held) == num_blocks, f"{free} free + {len(held)} held blocks != {num_blocks}"

        def _grow(self, request: int, n: int) -> bool:
            if self._unless_exhausted(f"allocate({request}, {n})",
                                      lambda: self.manager.allocate(request, n)) is EXHAUSTED:
                return False
            tokens = self.tokens.setdefault(request, [])
            self.computed[request] = len(tokens)
            tables = {kind: self.manager.block_table(request, kind) for kind in KINDS_OF_LAYER}
            for p in range(len(tokens), len(tokens) + n):
                token = next(self.ids)
                for kind, table in tables.items():
                    self.cache[kind, table[p // bs], p % bs] = token
                tokens.append(token)
            return True

        def _end(self, request: int) -> None:
            self.manager.free(request)
            del self.tokens[request], self.computed[request]

        def _free_units(self) -> int:
            return self.manager.num_free_blocks()

        def _state(self):
            return {"free blocks": self.manager.num_free_blocks(),
                    "block tables": {(r, kind): self.manager.block_table(r, kind)
                                     for r in self.tokens for kind in KINDS_OF_LAYER}}

    HybridContract.__name__ = f"HybridContract_{manager.name.replace('-', '_')}"
    return HybridContract
