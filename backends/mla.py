"""MLA adapters in vLLM's shape: a decode path over the latent cache and a prefill path that expands it.

As in vLLM's MLA backends, sequences with at most `decode_threshold` new tokens (speculative
decode included) take the decode path, the absorbed form: q_nope is folded through W_UK into the
latent space, attention runs over the paged latents in place as one KV head, and W_UV maps the
result out. The rest take the prefill path, the expanded form: each sequence's latents are gathered
through its block table and up-projected into per-head keys [k_nope, k_pe] (192) and values (128),
then ordinary causal attention. A mixed batch runs both. Subclasses bring their decode kernel
(latent_attention);
the prefill path here is plain torch (vLLM's runs flash-attn varlen on the same expansion).

`mla-torch`: both paths in plain torch (CPU and GPU). `mla-triton`: decode by our split-KV Triton
kernel (backends/triton_mla_kernels.py; under Triton's interpreter on CPU).
"""
from __future__ import annotations

import math

import torch

from conformance import Capabilities, MLABackend, MLACase, register_backend
from conformance.mla import (BatchPart, absorb_queries, causal_softmax, gather_latents, latent_values, project,
                             sparse_slots, split_batch, up_project)
from conformance.spec import KV_DTYPES, SPLIT_LATENT
from conformance.triton_rules import interpreter_refuses, no_triton_here

DECODE_THRESHOLD = 4  # vLLM: 1 + the number of speculative tokens; 3 draft tokens here


class MLACommon(MLABackend):
    decode_threshold = DECODE_THRESHOLD
    uniform_decode = False  # True: the decode kernel takes one query length per batch

    def run(self, case: MLACase):
        if case.spec.topk is not None:  # sparse: every query over its listed tokens (vLLM's sparse backends)
            o_lat, lse = self.sparse_attention(case, absorb_queries(case, case.q), sparse_slots(case))
            case.out[:] = up_project(case, o_lat)
            return case.out, lse
        lse = torch.full(case.out.shape[:2], math.nan, dtype=torch.float32, device=case.device)
        decode, prefill = split_batch(case, self.decode_threshold, self.uniform_decode)
        for part, path in ((decode, self.decode), (prefill, self.prefill)):
            if part is not None:
                out, part_lse = path(case, part)
                case.out[part.rows] = out
                lse[part.rows] = part_lse
        return case.out, lse

    def decode(self, case: MLACase, part: BatchPart) -> tuple[torch.Tensor, torch.Tensor]:
        """out [t, H, V] and lse [t, H] (natural log) of the part's queries, absorbed form: q_nope
        through W_UK, attention over the latents, W_UV on the result."""
        o_lat, lse = self.latent_attention(case, part, absorb_queries(case, case.q[part.rows]))
        return up_project(case, o_lat), lse

    def latent_attention(self, case: MLACase, part: BatchPart,
                         q_abs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode kernel: absorbed queries [t, H, L + R] over the part's paged latents, causal
        (bottom-right). Returns o_lat [t, H, L] and lse [t, H] (natural log)."""
        raise NotImplementedError

    def sparse_attention(self, case: MLACase, q_abs: torch.Tensor,
                         slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse MLA (a backend that declares the "sparse" feature): absorbed queries [T, H, L + R],
        each over the latents at its cache slots [T, topk] (sparse_slots; -1: none). Returns o_lat
        [T, H, L] and lse [T, H] (natural log)."""
        raise NotImplementedError

    def prefill(self, case: MLACase, part: BatchPart) -> tuple[torch.Tensor, torch.Tensor]:
        """The expanded form, per sequence, in plain torch: fp32 scores and softmax."""
        h, dtype = case.spec.heads, case.spec.dtype
        L = h.kv_lora_rank
        outs, lses = [], []
        qsl = part.query_start_loc.tolist()
        for i, seq in enumerate(part.seqs.tolist()):
            lat = gather_latents(case, seq, dtype)
            k_nope = project("nl,lhp->nhp", lat[:, :L], case.w_uk)
            k = torch.cat([k_nope, lat[:, None, L:].expand(-1, h.num_q_heads, -1)], -1)
            v = project("nl,lhv->nhv", lat[:, :L], case.w_uv)
            q = case.q[part.rows[qsl[i]:qsl[i + 1]]]
            p, lse = causal_softmax(torch.einsum("mhd,nhd->hmn", q.float(), k.float()) * case.scale,
                                    lat.shape[0] - q.shape[0])
            outs.append(torch.einsum("hmn,nhv->mhv", p, v.float()).to(dtype))
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)


class MLATorch(MLACommon):
    name = "mla-torch"
    description = (f"plain torch MLA: absorbed decode (up to {DECODE_THRESHOLD} new tokens) over the paged latents, "
                   "expanded prefill over latents gathered through the block table")
    capabilities = Capabilities(features=frozenset({"causal", "sparse"}), kv_dtypes=frozenset(KV_DTYPES),
                                returns_lse=True, cache_copies=0)  # gathers the sequences' latents, no pool copy

    def latent_attention(self, case, part, q_abs):
        L = case.spec.heads.kv_lora_rank
        outs, lses = [], []
        qsl = part.query_start_loc.tolist()
        for i, seq in enumerate(part.seqs.tolist()):
            lat = gather_latents(case, seq, case.spec.dtype).float()
            q = q_abs[qsl[i]:qsl[i + 1]].float()
            p, lse = causal_softmax(torch.einsum("mhd,nd->hmn", q, lat) * case.scale, lat.shape[0] - q.shape[0])
            outs.append(torch.einsum("hmn,nl->mhl", p, lat[:, :L]))
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    def sparse_attention(self, case, q_abs, slots):
        L = case.spec.heads.kv_lora_rank
        lat = latent_values(case.latent_cache.flatten(0, 1)[slots.clamp(min=0)], case.spec, case.kv_scale,
                            case.spec.dtype).float().masked_fill(slots[..., None] < 0, 0.0)  # [T, topk, L + R]
        s = torch.einsum("thd,tkd->thk", q_abs.float(), lat) * case.scale
        s = s.masked_fill(slots[:, None, :] < 0, -math.inf)
        return torch.einsum("thk,tkl->thl", torch.softmax(s, -1), lat[..., :L]), torch.logsumexp(s, -1)


class MLATriton(MLACommon):
    name = "mla-triton"
    description = (f"our split-KV Triton MLA decode kernel (up to {DECODE_THRESHOLD} new tokens) over the paged "
                   "latents; prefill expanded in torch")
    capabilities = Capabilities(features=frozenset({"causal", "sparse"}), kv_dtypes=frozenset(KV_DTYPES),
                                returns_lse=True, requires=("triton",), cache_copies=0)

    def __init__(self, kernels=None):
        self._kernels = kernels  # a module like backends.triton_mla_kernels (self-tests pass broken copies)

    def unavailable(self):
        return super().unavailable() or no_triton_here()

    def unsupported(self, spec, device):
        dims = (spec.heads.kv_lora_rank, spec.heads.qk_rope_head_dim)
        if any(d & (d - 1) or d < 16 for d in dims):
            return f"kv_lora_rank and qk_rope_head_dim {dims} must be powers of two >= 16 (the kernel's tiles)"
        return interpreter_refuses(spec, device)

    def kernels(self):
        if self._kernels is None:
            from conformance.backends import triton_mla_kernels  # imports triton: only once a case runs
            self._kernels = triton_mla_kernels
        return self._kernels

    def latent_attention(self, case, part, q_abs, slots=None):
        o_lat = torch.empty(*q_abs.shape[:2], case.spec.heads.kv_lora_rank, dtype=q_abs.dtype, device=case.device)
        split = SPLIT_LATENT.get(case.spec.kv_dtype)
        lse = self.kernels().mla_decode(q_abs, case.latent_cache, part.block_table, part.seq_lens,
                                        part.query_start_loc, o_lat, scale=case.scale, kv_scale=case.kv_scale,
                                        scale_tile=split and (split.tile or case.spec.heads.kv_lora_rank), slots=slots)
        return o_lat, lse

    def sparse_attention(self, case, q_abs, slots):
        return self.latent_attention(case, case, q_abs, slots)  # the case has a part's fields (its whole batch)


register_backend(MLATorch)
register_backend(MLATriton)
