"""A stand-in for vLLM v1's BlockPool (vllm.v1.core.block_pool), written from its interface in
vLLM 0.33, for machines without vLLM (its wheel is 336 MB and importing the module pulls about 25
packages: README). What the vllm-block-pool adapter uses: blocks with block_id and ref_cnt, block 0
the null block (taken at start), get_new_blocks (ValueError when short), touch (a reference more,
out of the free queue), is_block_writable, free_blocks (a reference less; freed blocks go to the
front of the queue, reused first), get_num_free_blocks. Prefix caching is not modelled: the
adapter turns it off."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    is_null: bool = False
    block_hash: object = None


class BlockPool:
    def __init__(self, num_gpu_blocks: int, enable_caching: bool, hash_block_size: int, **_):
        assert not enable_caching, "the stand-in models the pool without prefix caching"
        self.blocks = [KVCacheBlock(i) for i in range(num_gpu_blocks)]
        self.free_block_queue = deque(self.blocks)
        self.null_block = self.free_block_queue.popleft()
        self.null_block.is_null = True

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
        blocks = [self.free_block_queue.popleft() for _ in range(num_blocks)]
        for block in blocks:
            assert block.ref_cnt == 0
            block.ref_cnt += 1
        return blocks

    def touch(self, blocks) -> None:
        for block in blocks:
            if block.is_null:
                continue
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def is_block_writable(self, block: KVCacheBlock) -> bool:
        return not block.is_null and block.ref_cnt == 1 and block.block_hash is None

    def free_blocks(self, ordered_blocks) -> None:
        freed = []
        for block in ordered_blocks:
            if block.is_null:
                continue
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                freed.append(block)
        self.free_block_queue.extendleft(reversed(freed))  # to the front, in order

    def get_num_free_blocks(self) -> int:
        return len(self.free_block_queue)
