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
- an allocation that raises OutOfBlocks changed nothing;
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


def contract(manager: type[KVCacheManager], num_blocks: int = NUM_BLOCKS, block_size: int = BLOCK_SIZE):
    """The state machine (a RuleBasedStateMachine subclass) that holds `manager` to the contract;
    run it with hypothesis.stateful.run_state_machine_as_test."""
    bs = block_size

    class ManagerContract(RuleBasedStateMachine):
        requests = Bundle("requests")

        def __init__(self):
            super().__init__()
            self.manager = manager(num_blocks, block_size)
            self.tokens: dict[int, list[int]] = {}  # request -> the ids of the tokens it holds, in order
            self.cache: dict[tuple[int, int], int] = {}  # (block, slot) -> the token id last written there
            self.ids = iter(range(10**9))

        @rule(target=requests, n=st.integers(1, 3 * bs))
        def admit(self, n):
            request = next(self.ids)
            return request if self._write(request, n) else multiple()

        # A request that ended (in end_all) may still be drawn: then the step does nothing.
        @rule(request=requests, n=st.integers(1, 2 * bs))
        def append(self, request, n):
            if request in self.tokens:
                self._write(request, n)

        @rule(target=requests, parent=requests)
        def fork(self, parent):
            if parent not in self.tokens:
                return multiple()
            child = next(self.ids)
            self.manager.fork(parent, child)
            self.tokens[child] = list(self.tokens[parent])
            full = len(self.tokens[parent]) // bs
            mine, theirs = self.manager.block_table(child)[:full], self.manager.block_table(parent)[:full]
            assert mine == theirs, \
                f"fork({parent}, {child}): the child's full blocks {mine} are not the parent's {theirs}"
            return child

        @rule(request=consumes(requests))
        def finish(self, request):
            if request in self.tokens:
                self._free(request)

        @rule(request=consumes(requests), n=st.integers(1, 2 * bs))
        def abort(self, request, n):
            """Freed in the middle of a step: its new blocks allocated, nothing written yet."""
            if request in self.tokens:
                self._allocate(request, n)
                self._free(request)

        @rule()
        def end_all(self):
            """Every request ends: every block must be free again."""
            for r in list(self.tokens):
                self._free(r)
            free = self.manager.num_free_blocks()
            assert free == num_blocks, f"every request freed, but {free} of {num_blocks} blocks are free"

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

        def _allocate(self, request: int, n: int) -> list[tuple[int, int]] | None:
            """The manager's allocate, its copies made in the cache; None when it ran out of blocks
            (and then nothing may have changed)."""
            before = self._state()
            try:
                copies = self.manager.allocate(request, n)
            except OutOfBlocks:
                after = self._state()
                assert after == before, f"allocate({request}, {n}) raised OutOfBlocks but changed the manager: " \
                                        f"{_changes(before, after)}"
                return None
            for src, dst in copies:
                for slot in range(bs):
                    if (src, slot) in self.cache:
                        self.cache[dst, slot] = self.cache[src, slot]
            return copies

        def _write(self, request: int, n: int) -> bool:
            """Room for n more tokens, then their ids into the slots the table gives them."""
            if self._allocate(request, n) is None:
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

        def _free(self, request: int) -> None:
            self.manager.free(request)
            self.tokens.pop(request, None)

        def _state(self):
            return (self.manager.num_free_blocks(), {r: self.manager.block_table(r) for r in self.tokens},
                    [self.manager.ref_count(b) for b in range(num_blocks)])

    ManagerContract.__name__ = f"Contract_{manager.name.replace('-', '_')}"
    return ManagerContract


def ring_contract(manager: type[RingBufferManager], num_slots: int = NUM_SLOTS, window: int = WINDOW):
    """The state machine that holds a sliding-window ring-buffer manager to its contract: after
    every step each request's position is the tokens it appended, its window is its last
    min(tokens, window) tokens and reads back what was written there (the wrap-around at exactly
    the window), no slot is in two requests' windows (isolation), the free slots are the pool less
    every request's min(tokens, window) (the sliding layers' budget), an exhausted append changed
    nothing; a request admitted after others were released starts at position 0 in clean slots."""

    class RingContract(RuleBasedStateMachine):
        requests = Bundle("requests")

        def __init__(self):
            super().__init__()
            self.manager = manager(num_slots, window)
            self.tokens: dict[int, list[int]] = {}
            self.slots: dict[int, int] = {}  # slot -> the token id last written there
            self.ids = iter(range(10**9))

        @rule(target=requests, n=st.integers(1, 2 * window))
        def admit(self, n):
            request = next(self.ids)
            return request if self._append(request, n) else multiple()

        @rule(request=requests, n=st.integers(1, 2 * window))
        def append(self, request, n):
            if request in self.tokens:
                self._append(request, n)

        @rule(request=consumes(requests))
        def release(self, request):
            if request in self.tokens:
                self.manager.release(request)
                del self.tokens[request]

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

        def _append(self, request: int, n: int) -> bool:
            before = self._state()
            try:
                slots = self.manager.append(request, n)
            except OutOfBlocks:
                after = self._state()
                assert after == before, f"append({request}, {n}) raised OutOfBlocks but changed the manager: " \
                                        f"{before} -> {after}"
                return False
            assert len(slots) == n and all(0 <= s < num_slots for s in slots), \
                f"append({request}, {n}) gave slots {slots}: must be {n} of 0..{num_slots - 1}"
            tokens = self.tokens.setdefault(request, [])
            for slot in slots:
                self.slots[slot] = token = next(self.ids)
                tokens.append(token)
            return True

        def _state(self):
            return self.manager.num_free_slots(), {r: self.manager.window_slots(r) for r in self.tokens}

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

    class HybridContract(RuleBasedStateMachine):
        requests = Bundle("requests")

        def __init__(self):
            super().__init__()
            self.manager = manager(num_blocks, block_size, window)
            self.tokens: dict[int, list[int]] = {}
            self.computed: dict[int, int] = {}  # tokens before the request's last step
            self.cache: dict[tuple[str, int, int], int] = {}  # (kind, block, slot) -> token id
            self.ids = iter(range(10**9))

        @rule(target=requests, n=st.integers(1, 3 * bs))
        def admit(self, n):
            request = next(self.ids)
            return request if self._step(request, n) else multiple()

        @rule(request=requests, n=st.integers(1, 2 * bs))
        def append(self, request, n):
            if request in self.tokens:
                self._step(request, n)

        @rule(request=consumes(requests))
        def finish(self, request):
            if request in self.tokens:
                self._free(request)

        @rule()
        def end_all(self):
            for r in list(self.tokens):
                self._free(r)
            free = self.manager.num_free_blocks()
            assert free == num_blocks, f"every request freed, but {free} of {num_blocks} blocks are free"

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

        def _step(self, request: int, n: int) -> bool:
            before = self._state()
            try:
                self.manager.allocate(request, n)
            except OutOfBlocks:
                after = self._state()
                assert after == before, f"allocate({request}, {n}) raised OutOfBlocks but changed the manager: " \
                                        f"{before} -> {after}"
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

        def _free(self, request: int) -> None:
            self.manager.free(request)
            del self.tokens[request], self.computed[request]

        def _state(self):
            return self.manager.num_free_blocks(), {(r, kind): self.manager.block_table(r, kind)
                                                    for r in self.tokens for kind in KINDS_OF_LAYER}

    HybridContract.__name__ = f"HybridContract_{manager.name.replace('-', '_')}"
    return HybridContract


def _changes(before, after) -> str:
    names = ("free blocks", "block tables", "reference counts")
    return "; ".join(f"{n}: {b} -> {a}" for n, b, a in zip(names, before, after) if a != b)
