"""Built-in KV-cache manager adapters (conformance/managers.py).

`reference`: ours, the readable baseline: a free list, a reference count per block, forks that
share blocks, copy-on-write of a shared block before a write.
"""
from __future__ import annotations

from collections import deque

from conformance.managers import KVCacheManager, OutOfBlocks, register_manager


@register_manager
class RefCountedBlocks(KVCacheManager):
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
        new_blocks = -(-(held + num_tokens) // self.block_size) - len(table)
        # The next token goes into the last block, unless that is full: copy it first if shared.
        copy = held % self.block_size != 0 and self._refs[table[-1]] > 1
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
