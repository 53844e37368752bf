"""Broken copies of the reference KV-cache manager (conformance.managers.RefCountedBlocks), one bug class each.
The self-tests assert the manager contract (conformance/manager_checks.py) catches every one."""
from __future__ import annotations

from conformance import OutOfBlocks
from conformance.managers import HybridBlocks, RefCountedBlocks, RingSlots

BUGS = {
    "double_free": "free() releases the request's last block twice",
    "fork_without_reference": "fork shares the parent's blocks without counting the new references",
    "no_copy_on_write": "a write into a shared partial block goes into the shared block itself",
    "free_loses_new_blocks": "free() does not return the blocks of the request's latest allocation (an abort "
                             "mid-step loses them)",
    "half_allocated_on_exhaustion": "allocate that runs out of blocks raises only after taking every free one",
    "fork_without_sharing": "fork gives the child fresh blocks for the parent's full blocks instead of sharing them",
    "refuses_with_room": "allocate raises OutOfBlocks when it would take the last free block (one held back)",
    "unshares_full_blocks": "allocate copies the request's shared full blocks too (data kept, sharing lost)",
}


class BrokenBlocks(RefCountedBlocks):
    bug = ""

    def allocate(self, request, num_tokens):
        if self.bug == "refuses_with_room" and sum(self._needed(request, num_tokens)) == len(self._free) > 0:
            raise OutOfBlocks(f"request {request}: keeping the last free block back")
        if self.bug == "half_allocated_on_exhaustion":
            try:
                return super().allocate(request, num_tokens)
            except OutOfBlocks:  # ... after taking what was left
                self._tokens.setdefault(request, 0)
                self._tables.setdefault(request, []).extend(self._take() for _ in range(len(self._free)))
                raise
        before = len(self._tables.get(request, []))
        copies = super().allocate(request, num_tokens)
        if self.bug == "no_copy_on_write":  # undo the copy: the shared block stays in the table
            for src, dst in copies:
                table = self._tables[request]
                table[table.index(dst)] = src
                self._refs[src] += 1
                self._release(dst)
            copies = []
        if self.bug == "unshares_full_blocks":
            table = self._tables[request]
            for i in range(self._tokens[request] // self.block_size):
                if self._refs[table[i]] > 1 and self._free:
                    dst = self._take()
                    copies.append((table[i], dst))
                    self._release(table[i])
                    table[i] = dst
        self._latest = getattr(self, "_latest", {})
        self._latest[request] = self._tables[request][before:]
        return copies

    def fork(self, parent, child):
        super().fork(parent, child)
        if self.bug == "fork_without_reference":
            for block in self._tables[child]:
                self._refs[block] -= 1
        elif self.bug == "fork_without_sharing":
            table = self._tables[child]
            for i in range(min(self._tokens[child] // self.block_size, len(self._free))):
                self._release(table[i])
                table[i] = self._take()

    def free(self, request):
        table = self._tables[request]
        if self.bug == "free_loses_new_blocks":
            kept = getattr(self, "_latest", {}).get(request, [])
            self._tables[request] = [b for b in table if b not in kept]
        elif self.bug == "double_free":
            self._release(table[-1])
        super().free(request)


def mutant(bug: str) -> type[RefCountedBlocks]:
    assert bug in BUGS, bug
    return type(f"Broken_{bug}", (BrokenBlocks,), {"bug": bug, "name": f"mutant-{bug.replace('_', '-')}",
                                                 "description": BUGS[bug]})


class RingWrapsEarly(RingSlots):
    """A ring of window - 1 slots: it wraps one slot early, over the oldest token of the window."""

    name = "mutant-ring-wraps-early"

    def __init__(self, num_slots, window):
        super().__init__(num_slots, window - 1)


class HybridFreesEarly(HybridBlocks):
    """Sliding blocks given back one block early: the oldest key the step's first query sees is gone."""

    name = "mutant-hybrid-frees-early"

    def _unseen(self, computed):
        return max(0, computed - self.window + 1 + self.block_size) // self.block_size
