"""Built-in KV-cache manager adapters (conformance/managers.py).

`reference`: ours, the readable baseline (conformance.managers.RefCountedBlocks, which the rollout
cases hand out their blocks with): a free list, a reference count per block, forks that share
blocks, copy-on-write of a shared block before a write.
"""
from conformance.managers import RefCountedBlocks, register_manager

register_manager(RefCountedBlocks)
