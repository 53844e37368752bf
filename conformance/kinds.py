"""Case kinds: what differs between dense attention and MLA cases, one object each.

A kind draws a case's inputs, computes its references, writes the new tokens into its caches by
default and says what they must hold after a run; the runner, bench and the front ends look the
kind up by `CaseSpec.kind` and call it, never branching on the kind themselves. Imports run one
way: spec <- paged / reference <- mla <- kinds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .mla import MLACase, make_mla_inputs, mla_reference, scatter_latent
from .paged import Case, Pages, PagedBatch, make_dense_inputs, scatter_to_cache
from .reference import Reference, dense_reference
from .spec import CaseSpec

# A cache's name, the cache after the run, and the writes it must hold: (slots, stored values).
ExpectedCache = tuple[str, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class CaseKind:
    name: str  # CaseSpec.kind
    make_inputs: Callable[[CaseSpec, torch.device | str, int], Pages]
    reference: Callable[[Pages, str], Reference]  # precision "float64" (the truth) or "lowp"
    write_cache: Callable[[PagedBatch], None]  # the default cache write (Backend.write_cache)
    expected_caches: Callable[[PagedBatch, Pages], list[ExpectedCache]]
    bytes_moved: Callable[[PagedBatch], int]  # what a kernel must read and write at least (bench's GB/s)
    # (query/key, value) widths per query head of the widest form the reference pads to (memory estimate)
    reference_widths: Callable[[object], tuple[int, int]]
    # The Capabilities fields about head shapes that mean something for this kind, and the unmet
    # ones among them for a case's heads: (capabilities, heads) -> reasons.
    head_capabilities: tuple[str, ...]
    head_rules: Callable[[object, object], list[str]]
    # The pytest test that runs this kind's pairs, in tests/<test>.py: ids read `<test>[<backend>-<case id>]`;
    # the fixture that hands it a (backend, case) pair (the plugin parametrizes every kind's the same way).
    test: str = ""
    fixture: str = ""

    def test_id(self, backend: str, case_id: str) -> str:
        return f"{self.test}[{backend}-{case_id}]"

    def keywords(self, backend: str, case_id: str) -> set[str]:
        """The names pytest's -k matches for this pair's test: its id, its module's and its folder's."""
        return {self.test_id(backend, case_id), f"{self.test}.py", "tests"}


def _dense_caches(case: Case, inputs) -> list[ExpectedCache]:
    """K and V: the context as handed over, and the new tokens as the default write stores them,
    all from the harness's own copies (an adapter may change the case's slot mapping or K/V)."""
    return [(f"{which}_cache", cache, [(inputs.context_slots, inputs.stored(which, inputs.context_index)),
                                       (inputs.slot_mapping, inputs.stored(which, inputs.new_token_index))])
            for which, cache in (("k", case.k_cache), ("v", case.v_cache))]


def _latent_caches(case: MLACase, inputs) -> list[ExpectedCache]:
    """The latent cache: the context as handed over, and [kv_c, k_pe] of the new tokens (as above)."""
    return [("latent_cache", case.latent_cache, [(inputs.context_slots, inputs.stored(inputs.context_index)),
                                                 (inputs.slot_mapping, inputs.stored(inputs.new_token_index))])]


def _q_and_out_bytes(case: PagedBatch) -> int:
    return case.q.numel() * case.q.element_size() + case.out.numel() * case.out.element_size()


def _dense_bytes(case: Case) -> int:
    """Every context token's K and V once, the queries and the output."""
    hkv, d = case.k_cache.shape[-2:]
    return 2 * int(case.seq_lens.sum()) * hkv * d * case.k_cache.element_size() + _q_and_out_bytes(case)


def _latent_bytes(case: MLACase) -> int:
    """Every context token's latent once (shared by all heads), the queries and the output."""
    latent = int(case.seq_lens.sum()) * case.latent_cache.shape[-1] * case.latent_cache.element_size()
    return latent + _q_and_out_bytes(case)


def _dense_head_rules(caps, h) -> list[str]:
    unmet = []
    if caps.head_dims is not None and h.head_dim not in caps.head_dims:
        unmet.append(f"head_dim {h.head_dim} not supported (supports: {sorted(caps.head_dims)})")
    if caps.gqa_ratios is not None and h.group_size not in caps.gqa_ratios:
        unmet.append(f"GQA ratio {h.group_size} not supported (supports: {sorted(caps.gqa_ratios)})")
    return unmet


def _latent_head_rules(caps, h) -> list[str]:
    dims = (h.kv_lora_rank, h.qk_rope_head_dim)
    if caps.latent_dims is not None and dims not in caps.latent_dims:
        return [f"latent {dims[0]} + rope {dims[1]} not supported (supports: {sorted(caps.latent_dims)})"]
    return []


DENSE = CaseKind("mha", make_dense_inputs, dense_reference, scatter_to_cache, _dense_caches, _dense_bytes,
                 reference_widths=lambda h: (h.head_dim, h.out_dim),
                 head_capabilities=("head_dims", "gqa_ratios"), head_rules=_dense_head_rules, test="test_backend",
                 fixture="conformance_case")
MLA = CaseKind("mla", make_mla_inputs, mla_reference, scatter_latent, _latent_caches, _latent_bytes,
               reference_widths=lambda h: (h.latent_dim, h.kv_lora_rank),  # the absorbed form
               head_capabilities=("latent_dims",), head_rules=_latent_head_rules,
               test="test_mla_backend", fixture="mla_case")
KINDS = {kind.name: kind for kind in (DENSE, MLA)}


def kind_of(spec: CaseSpec) -> CaseKind:
    return KINDS[spec.kind]


def make_inputs(spec: CaseSpec, device: torch.device | str, seed: int) -> Pages:
    """Draw a case's data (Inputs for a dense case, MLAInputs for an MLA one)."""
    return kind_of(spec).make_inputs(spec, device, seed)


def reference_attention(inputs: Pages, precision: str = "float64") -> Reference:
    """A case's ground truth ("float64") or its low-precision twin ("lowp"), which calibrates the tolerance."""
    return kind_of(inputs.spec).reference(inputs, precision)
