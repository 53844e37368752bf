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
from dataclasses import dataclass

import torch

from conformance import Capabilities, MLABackend, MLACase, register_backend
from conformance.triton_rules import interpreter_refuses, no_triton_here

DECODE_THRESHOLD = 4  # vLLM: 1 + the number of speculative tokens; 3 draft tokens here


@dataclass
class Part:
    """The sequences of a case that take one path, as their own batch."""

    seqs: torch.Tensor  # [b] int64: which sequences of the case
    rows: torch.Tensor  # [t] int64: their query / output rows in the case
    seq_lens: torch.Tensor  # [b] int32
    query_start_loc: torch.Tensor  # [b + 1] int32, into the part's own rows
    block_table: torch.Tensor  # [b, max_blocks] int32
    max_query_len: int


def split_batch(case: MLACase, threshold: int, uniform: bool) -> tuple[Part | None, Part | None]:
    """(decode, prefill): sequences with at most `threshold` new tokens, and the rest. `uniform`:
    the decode kernel takes one query length per batch, so (vLLM's require_uniform) only sequences
    with the first decode sequence's length decode."""
    qsl = case.query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    decode = q_lens <= threshold
    if uniform and decode.any():
        decode &= q_lens == q_lens[decode][0]
    return _part(case, torch.nonzero(decode).flatten(), q_lens), _part(case, torch.nonzero(~decode).flatten(), q_lens)


def _part(case: MLACase, seqs: torch.Tensor, q_lens: torch.Tensor) -> Part | None:
    if not seqs.numel():
        return None
    lens = q_lens[seqs]
    starts = case.query_start_loc.long()[seqs]
    local = torch.arange(int(lens.sum()), device=seqs.device)
    first = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    rows = torch.repeat_interleave(starts, lens) + local - first
    qsl = torch.zeros(seqs.numel() + 1, dtype=torch.int32, device=seqs.device)
    qsl[1:] = torch.cumsum(lens, 0)
    return Part(seqs, rows, case.seq_lens[seqs], qsl, case.block_table[seqs], int(lens.max()))


def gather_latents(case: MLACase, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """Sequence `seq`'s latents [n, L + R] read through its block table, dequantized to `dtype`."""
    bs = case.latent_cache.shape[1]
    pos = torch.arange(int(case.seq_lens[seq]), device=case.device)
    lat = case.latent_cache[case.block_table[seq, pos // bs].long(), pos % bs]
    return (lat.float() * case.kv_scale).to(dtype) if lat.dtype == torch.float8_e4m3fn else lat.to(dtype)


def _matmul(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A projection as a GPU GEMM does it: inputs in the case's dtype, fp32 accumulation, output
    rounded to the dtype (done in fp32 here, also because CPU fp16 matmuls are slow)."""
    return torch.einsum(equation, a.float(), b.float()).to(a.dtype)


def causal_softmax(scores: torch.Tensor, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over keys of fp32 scores [H, m, n] of m new queries after ctx context tokens,
    bottom-right causal (query i sees keys 0..ctx + i). Returns (probabilities, lse [m, H])."""
    m, n = scores.shape[1:]
    visible = torch.arange(n, device=scores.device)[None, :] <= ctx + torch.arange(m, device=scores.device)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1), torch.logsumexp(scores, -1).transpose(0, 1)


class MLACommon(MLABackend):
    decode_threshold = DECODE_THRESHOLD
    uniform_decode = False  # True: the decode kernel takes one query length per batch

    def run(self, case: MLACase):
        lse = torch.full(case.out.shape[:2], math.nan, dtype=torch.float32, device=case.device)
        decode, prefill = split_batch(case, self.decode_threshold, self.uniform_decode)
        for part, path in ((decode, self.decode), (prefill, self.prefill)):
            if part is not None:
                out, part_lse = path(case, part)
                case.out[part.rows] = out
                lse[part.rows] = part_lse
        return case.out, lse

    def decode(self, case: MLACase, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        """out [t, H, V] and lse [t, H] (natural log) of the part's queries, absorbed form: q_nope
        through W_UK, attention over the latents, W_UV on the result."""
        o_lat, lse = self.latent_attention(case, part, self.absorb(case, case.q[part.rows]))
        return self.up_project(case, o_lat), lse

    def latent_attention(self, case: MLACase, part: Part, q_abs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode kernel: absorbed queries [t, H, L + R] over the part's paged latents, causal
        (bottom-right). Returns o_lat [t, H, L] and lse [t, H] (natural log)."""
        raise NotImplementedError

    def prefill(self, case: MLACase, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        """The expanded form, per sequence, in plain torch: fp32 scores and softmax."""
        h, dtype = case.spec.heads, case.spec.dtype
        L = h.kv_lora_rank
        outs, lses = [], []
        qsl = part.query_start_loc.tolist()
        for i, seq in enumerate(part.seqs.tolist()):
            lat = gather_latents(case, seq, dtype)
            k_nope = _matmul("nl,lhp->nhp", lat[:, :L], case.w_uk)
            k = torch.cat([k_nope, lat[:, None, L:].expand(-1, h.num_q_heads, -1)], -1)
            v = _matmul("nl,lhv->nhv", lat[:, :L], case.w_uv)
            q = case.q[part.rows[qsl[i]:qsl[i + 1]]]
            p, lse = causal_softmax(torch.einsum("mhd,nhd->hmn", q.float(), k.float()) * case.scale,
                                    lat.shape[0] - q.shape[0])
            outs.append(torch.einsum("hmn,nhv->mhv", p, v.float()).to(dtype))
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    @staticmethod
    def absorb(case: MLACase, q: torch.Tensor) -> torch.Tensor:
        """Queries [t, H, P + R] in the absorbed form [t, H, L + R]: q_nope through W_UK, in the case's dtype."""
        P = case.spec.heads.qk_nope_head_dim
        return torch.cat([_matmul("thp,lhp->thl", q[..., :P], case.w_uk), q[..., P:]], -1)

    @staticmethod
    def up_project(case: MLACase, o_lat: torch.Tensor) -> torch.Tensor:
        """Latent outputs [t, H, L] through W_UV: [t, H, V]."""
        return _matmul("thl,lhv->thv", o_lat.to(case.spec.dtype), case.w_uv)


class MLATorch(MLACommon):
    name = "mla-torch"
    description = (f"plain torch MLA: absorbed decode (up to {DECODE_THRESHOLD} new tokens) over the paged latents, "
                   "expanded prefill over latents gathered through the block table")
    capabilities = Capabilities(features=frozenset({"causal"}), kv_dtypes=frozenset({"auto", "fp8_e4m3"}),
                                returns_lse=True)

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


class MLATriton(MLACommon):
    name = "mla-triton"
    description = (f"our split-KV Triton MLA decode kernel (up to {DECODE_THRESHOLD} new tokens) over the paged "
                   "latents; prefill expanded in torch")
    capabilities = Capabilities(features=frozenset({"causal"}), kv_dtypes=frozenset({"auto", "fp8_e4m3"}),
                                returns_lse=True, requires=("triton",))

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
            from backends import triton_mla_kernels  # imports triton: only once a case runs
            self._kernels = triton_mla_kernels
        return self._kernels

    def latent_attention(self, case, part, q_abs):
        o_lat = torch.empty(*q_abs.shape[:2], case.spec.heads.kv_lora_rank, dtype=q_abs.dtype, device=case.device)
        lse = self.kernels().mla_decode(q_abs, case.latent_cache, part.block_table, part.seq_lens,
                                        part.query_start_loc, o_lat, scale=case.scale, kv_scale=case.kv_scale)
        return o_lat, lse


register_backend(MLATorch)
register_backend(MLATriton)
