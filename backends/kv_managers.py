"""Built-in KV-cache manager adapters (conformance/managers.py).

- `reference`: ours, the readable baseline (conformance.managers.RefCountedBlocks, which the rollout
  cases hand out their blocks with): a free list, a reference count per block, forks that share
  blocks, copy-on-write of a shared block before a write.
- `reference-ring`: our sliding-window ring buffer (conformance.managers.RingSlots).
- `reference-hybrid`: our hybrid manager, full-attention and sliding-window layers' tables from one
  pool (conformance.managers.HybridBlocks).
- `vllm-block-pool`: vLLM v1's BlockPool (vllm.v1.core.block_pool), the allocator and reference
  counts under vLLM's KVCacheManager, prefix caching off. The per-request tables are the adapter's,
  as vLLM's SingleTypeKVCacheManager keeps them: a fork touches the parent's blocks (the way a
  prefix-cache hit shares them), a write into a block that is not writable (shared) takes a new
  block and frees the old reference, a request's blocks are freed tail first. Block 0 of the pool
  is vLLM's null block, so the pool has one block more than the manager hands out.
"""
from __future__ import annotations

import importlib

from conformance.managers import (HybridBlocks, KVCacheManager, OutOfBlocks, RefCountedBlocks, RingSlots,
                                  register_manager)

register_manager(RefCountedBlocks)
register_manager(RingSlots)
register_manager(HybridBlocks)


@register_manager
class VLLMBlockPool(KVCacheManager):
    name = "vllm-block-pool"
    description = "vLLM v1 BlockPool (prefix caching off) under per-request tables, as its KVCacheManager keeps them"
    pool_class = None  # vllm.v1.core.block_pool.BlockPool unless set (self-tests set a stand-in)

    @classmethod
    def unavailable(cls):
        if cls.pool_class is None:
            try:  # the module itself: a `vllm` carrying only its FlashAttention build (the GPU kit) has none
                importlib.import_module("vllm.v1.core.block_pool")
            except Exception as e:  # noqa: BLE001 - missing or broken: skipped with its reason
                return f"vllm.v1.core.block_pool is not importable ({type(e).__name__}: {e})"
        return None

    def __init__(self, num_blocks, block_size):
        super().__init__(num_blocks, block_size)
        if self.pool_class is None:
            from vllm.v1.core.block_pool import BlockPool

            type(self).pool_class = BlockPool
        self.pool = self.pool_class(num_blocks + 1, enable_caching=False, hash_block_size=block_size)
        self.tables: dict[int, list] = {}  # request -> its KVCacheBlocks
        self.tokens: dict[int, int] = {}

    def allocate(self, request, num_tokens):
        table, held = self.tables.get(request, []), self.tokens.get(request, 0)
        new_blocks = -(-(held + num_tokens) // self.block_size) - len(table)
        copy = held % self.block_size != 0 and not self.pool.is_block_writable(table[-1])
        if new_blocks + copy > self.pool.get_num_free_blocks():
            raise OutOfBlocks(f"request {request} needs {new_blocks + copy} blocks; "
                              f"{self.pool.get_num_free_blocks()} free")
        copies = []
        if copy:
            dst = self.pool.get_new_blocks(1)[0]
            copies.append((table[-1].block_id - 1, dst.block_id - 1))
            self.pool.free_blocks([table[-1]])
            table[-1] = dst
        table += self.pool.get_new_blocks(new_blocks) if new_blocks else []
        self.tables[request], self.tokens[request] = table, held + num_tokens
        return copies

    def fork(self, parent, child):
        self.tables[child], self.tokens[child] = list(self.tables[parent]), self.tokens[parent]
        self.pool.touch(self.tables[child])

    def free(self, request):
        self.pool.free_blocks(reversed(self.tables.pop(request)))
        del self.tokens[request]

    def block_table(self, request):
        return [b.block_id - 1 for b in self.tables[request]]

    def num_free_blocks(self):
        return self.pool.get_num_free_blocks()

    def ref_count(self, block):
        return self.pool.blocks[block + 1].ref_cnt
