"""Built-in adapters. Importing this package registers them (no entry points needed, so a plain
checkout on PYTHONPATH works). An adapter whose library is missing still registers: its cases
skip with the reason."""
from . import flash_attn, flashinfer, flashmla, flex, kv_managers, mla, sdpa, triton_attention  # noqa: F401
