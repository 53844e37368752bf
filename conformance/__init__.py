"""Attention-backend conformance: paged-KV cases, an independent ground truth, and a registry.

The repository's top-level folders backends/, fixtures/ and tests/ are this package's subpackages
`conformance.backends`, `conformance.fixtures` and `conformance.tests`: an install maps them
(pyproject.toml's package-dir), and a checkout on PYTHONPATH finds them beside this folder."""
import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "backends").exists() and (_CHECKOUT / "backends" / "__init__.py").exists():
    __path__.append(str(_CHECKOUT))  # noqa: F821 - a checkout: conformance.backends is ../backends

import torch

if not torch.cuda.is_available():
    # Triton has no CPU target: without CUDA, Triton kernels run under its interpreter. Triton reads
    # the flag when it is first imported (torch._dynamo imports it), so it is set here, first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# isort: split
from . import modes  # noqa: F401 - first: the call modes' rules check every CaseSpec (spec.CALL_MODES)
from .kinds import make_inputs, reference_attention
from .known import KnownFailure
from .managers import KVCacheManager, OutOfBlocks, load_managers, register_manager
from .matrix import Catalog
from .paged import Case, Inputs, gather_kv, scatter_to_cache
from .mla import (BatchPart, MLACase, MLAInputs, absorb_queries, causal_softmax, gather_latents, latent_values,
                  scatter_latent, sparse_slots, split_batch, up_project)
from .reference import Reference
from .registry import (ENTRY_POINT_GROUP, Backend, Capabilities, MLABackend, RegistryError, get_backend,
                       load_backends, register_backend, Unsupported)
from .result import Category, Result, Status
from .runner import Runner
from .spec import BatchSpec, CaseSpec, HeadConfig, MLAHeads, Scenario, SpecError
from .tolerance import Tolerance, compare

__all__ = [
    "BatchPart", "BatchSpec", "Backend", "Capabilities", "Case", "Catalog", "Category", "CaseSpec", "ENTRY_POINT_GROUP",
    "HeadConfig", "Inputs", "KVCacheManager", "KnownFailure", "MLABackend", "MLACase", "MLAHeads", "MLAInputs",
    "OutOfBlocks", "Reference", "RegistryError", "Result", "Runner", "Scenario", "SpecError", "Status", "Tolerance", "Unsupported",
    "absorb_queries", "causal_softmax", "compare", "gather_kv", "gather_latents", "get_backend", "load_backends",
    "latent_values", "load_managers", "make_inputs", "reference_attention", "register_backend", "register_manager",
    "scatter_latent", "scatter_to_cache", "sparse_slots", "split_batch", "up_project",
]
