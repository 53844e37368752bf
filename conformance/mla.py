"""MLA cases: DeepSeek-style multi-head latent attention over a paged latent cache.

The cache keeps one latent per token, [kv_c (kv_lora_rank), k_pe (qk_rope_head_dim)], 576
elements for DeepSeek, in [num_blocks, block_size, 576] pages with the same shuffled block tables,
null block and poison as the dense cases. Per case, W_UK [L, H, P] and W_UV [L, H, V] (vLLM's
kv_b_proj weight, transposed and split) turn a latent into head h's key nope part and value:

    k[n, h] = [kv_c[n] @ W_UK[:, h], k_pe[n]]      v[n, h] = kv_c[n] @ W_UV[:, h]

and query h is [q_nope, q_pe] (P + R = 192 wide), so the softmax scale is 1/sqrt(192). That is
the expanded (MHA) form, the ground truth here. The absorbed (MQA) form folds W_UK into the query
and W_UV into the output, attending over the latent itself as one KV head shared by every head:

    q_abs[t, h] = [W_UK[:, h] @ q_nope[t, h], q_pe[t, h]]   out[t, h] = (softmax . kv_c) @ W_UV[:, h]

Both are computed (float64 agrees to rounding; a self-test holds them to it). The low-precision
reference, which calibrates the tolerance, is whichever form lands farther from the truth when
computed the way kernels in the case's dtype do: a backend may take either path.

The cache holds the latents in the case's dtype, as fp8 codes with one scale, or as split entries
of bytes (spec.SPLIT_LATENT: fp8 codes with their own scales, k_pe exact; store_latent and
latent_values); the truth attends over what the cache holds, dequantized exactly. A sparse case
(spec.topk) gives each query an index list and the truth attends exactly the listed keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .paged import Pages, PagedBatch, copy_shared_prefix, dequantize, draw_pages, fp8_scale, poison_value, quantize
from .reference import Reference, attend, precision_of
from .spec import SPLIT_LATENT, CaseSpec, SpecError


@dataclass
class MLACase(PagedBatch):
    """What an MLA adapter gets (spec.kind "mla"). q [T, H, P + R]: q_nope then q_pe, as vLLM's
    MLA layer hands it over; out [T, H, V]."""

    new_token_fields: ClassVar[tuple[str, ...]] = PagedBatch.new_token_fields + ("kv_c_new", "k_pe_new")
    kv_c_new: torch.Tensor  # [T, L], the new tokens' latents, to be written to the cache
    k_pe_new: torch.Tensor  # [T, R], their rope keys
    # [num_blocks, block_size, L + R] of spec.cache_dtype: kv_c then k_pe per token; context
    # pre-written, the rest poisoned. fp8: a stored code c stands for c * kv_scale. A split cache:
    # uint8 [num_blocks, block_size, entry bytes] (store_latent).
    latent_cache: torch.Tensor
    w_uk: torch.Tensor  # [L, H, P]: k_nope[n, h] = kv_c[n] @ w_uk[:, h]
    w_uv: torch.Tensor  # [L, H, V]: v[n, h] = kv_c[n] @ w_uv[:, h]
    kv_scale: float = 1.0
    # Sparse cases (spec.topk): [T, topk] int32, the positions in its sequence each query attends
    # (each one it can see, none twice), -1 entries anywhere for none; else None.
    topk_indices: torch.Tensor | None = None


@dataclass
class MLAInputs(Pages):
    """All random data of an MLA case, drawn once from the case's own seed."""

    latent: torch.Tensor  # [N, L + R], every sequence's latents packed (context then new tokens)
    w_uk: torch.Tensor
    w_uv: torch.Tensor
    kv_scale: float = 1.0
    topk_indices: torch.Tensor | None = None  # sparse cases: as MLACase's
    truth: Reference | None = field(default=None, repr=False)  # the float64 reference, once computed

    def allowed(self) -> torch.Tensor:
        """The keys each query of a sparse case may see, [B, max_q, max_kv] bool: its index list."""
        b, idx = self.spec.batch, self.topk_indices.long()
        q_lens = torch.tensor(b.query_lens, device=idx.device)
        seq = torch.repeat_interleave(torch.arange(b.batch_size, device=idx.device), q_lens)
        local = torch.arange(len(idx), device=idx.device) - (torch.cumsum(q_lens, 0) - q_lens)[seq]
        mask = torch.zeros(b.batch_size, max(b.query_lens), max(b.seq_lens) + 1, dtype=torch.bool, device=idx.device)
        mask[seq[:, None], local[:, None], torch.where(idx >= 0, idx, max(b.seq_lens))] = True  # -1: a spare column
        return mask[..., :-1]

    def stored(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Rows of the packed latents as the cache stores them (fp8 codes for an fp8 cache, entries
        of bytes for a split one)."""
        return store_latent(self.latent[rows], self.spec, self.kv_scale)

    def materialize(self, finite_poison: bool = False) -> MLACase:
        spec, heads = self.spec, self.spec.heads
        bs = spec.block_size
        poison = poison_value(spec.cache_dtype, finite_poison)
        width = spec.cache_bytes_per_token // spec.cache_dtype.itemsize
        cache = torch.full((self.num_blocks, bs, width), poison, dtype=spec.cache_dtype, device=self.q.device)
        cache[self.context_slots // bs, self.context_slots % bs] = self.stored(self.context_index)
        new = self.latent[self.new_token_index]
        return MLACase(
            **self.batch_fields(heads.v_head_dim, poison),
            kv_c_new=new[:, :heads.kv_lora_rank].contiguous(),
            k_pe_new=new[:, heads.kv_lora_rank:].contiguous(),
            latent_cache=cache,
            w_uk=self.w_uk.clone(),
            w_uv=self.w_uv.clone(),
            kv_scale=self.kv_scale,
            topk_indices=None if self.topk_indices is None else self.topk_indices.clone(),
        )


def scatter_latent(case: MLACase) -> None:
    """The default MLA cache write (vLLM's concat_and_cache_mla): [kv_c, k_pe] of each new token
    into its slot, quantized for an fp8 cache, packed for a split one."""
    bs = case.latent_cache.shape[1]
    new = torch.cat([case.kv_c_new, case.k_pe_new], -1)
    case.latent_cache[case.slot_mapping // bs, case.slot_mapping % bs] = store_latent(new, case.spec, case.kv_scale)


def store_latent(x: torch.Tensor, spec: CaseSpec, kv_scale: float) -> torch.Tensor:
    """What the cache stores for latents x [..., L + R] of the case's dtype: x itself, fp8 codes of
    x / kv_scale, or split entries (spec.SplitLatent) [..., entry bytes]: the kv_c codes (each
    round-to-nearest-even of the correctly rounded fp32 quotient, as in quantize), the fp32 tile
    scales, k_pe's own bits."""
    split = SPLIT_LATENT.get(spec.kv_dtype)
    if split is None:
        return quantize(x, kv_scale, spec.cache_dtype)
    L = spec.heads.kv_lora_rank
    kv_c = x[..., :L].double().unflatten(-1, (split.tiles(L), -1))
    # amax / 448 correctly rounded to fp32 (from float64); a tile of zeros gets the smallest normal scale.
    scale = (kv_c.abs().amax(-1) / torch.finfo(torch.float8_e4m3fn).max).float()
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    if split.pow2_scales:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    codes = (kv_c / scale.double()[..., None]).float().to(torch.float8_e4m3fn).flatten(-2)
    return torch.cat([codes.view(torch.uint8), scale.view(torch.uint8), x[..., L:].contiguous().view(torch.uint8)], -1)


def latent_values(stored: torch.Tensor, spec: CaseSpec, kv_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache contents [..., width] as the latents [..., L + R] they stand for, in `dtype` (each value
    code * scale exactly, then rounded once to `dtype`)."""
    split = SPLIT_LATENT.get(spec.kv_dtype)
    if split is None:
        return dequantize(stored, kv_scale, dtype)
    L, tiles = spec.heads.kv_lora_rank, split.tiles(spec.heads.kv_lora_rank)
    codes = stored[..., :L].contiguous().view(torch.float8_e4m3fn).double()
    scales = stored[..., L:L + 4 * tiles].contiguous().view(torch.float32).double()
    k_pe = stored[..., L + 4 * tiles:].contiguous().view(spec.dtype).double()
    kv_c = (codes.unflatten(-1, (tiles, -1)) * scales[..., None]).flatten(-2)
    return torch.cat([kv_c, k_pe], -1).to(dtype)


def make_mla_inputs(spec: CaseSpec, device: torch.device | str, seed: int) -> MLAInputs:
    if spec.kind != "mla":
        raise SpecError(f"CaseSpec.heads = {spec.heads!r}: make_mla_inputs needs MLAHeads")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    h = spec.heads

    def randn(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)).to(spec.dtype)

    # Latents and queries O(1), as after the layer's RMSNorm and rope; weights N(0, 1/L), so the
    # expanded keys and values are O(1) too and the scores are N(0, 1) after the 1/sqrt(192) scale.
    q = randn(spec.batch.num_query_tokens, h.num_q_heads, h.head_dim)
    latent = randn(sum(spec.batch.seq_lens), h.latent_dim)
    w_uk = randn(h.kv_lora_rank, h.num_q_heads, h.qk_nope_head_dim, std=h.kv_lora_rank ** -0.5)
    w_uv = randn(h.kv_lora_rank, h.num_q_heads, h.v_head_dim, std=h.kv_lora_rank ** -0.5)
    pages = draw_pages(spec, gen, device)
    copy_shared_prefix(spec, latent)
    # Rounded to bf16 as well: FlashInfer's MLA kernels multiply the codes by the scale cast to
    # bf16, and a scale every implementation holds exactly keeps the comparison about the kernel.
    kv_scale = float(torch.tensor(fp8_scale(latent, spec)).to(torch.bfloat16))
    topk = None if spec.topk is None else _draw_topk(spec, gen, device)
    return MLAInputs(spec=spec, q=q, latent=latent, w_uk=w_uk, w_uv=w_uv, kv_scale=kv_scale, topk_indices=topk,
                     **pages)


def _draw_topk(spec: CaseSpec, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Index lists [T, topk] as an indexer gives them: for each query a random pick of min(topk,
    keys it sees) of the positions 0..its own (half as many for every other query), each list
    shuffled with its -1 padding, so lists are full, half padding, or (topk past the context)
    mostly padding, and no two queries' lists agree."""
    b, n = spec.batch, max(spec.batch.seq_lens)
    q_pos = torch.cat([torch.arange(c, c + q, device=device) for c, q in zip(b.context_lens, b.query_lens)])
    visible = torch.arange(n, device=device)[None, :] <= q_pos[:, None]
    score = torch.rand(len(q_pos), n, generator=gen, device=device).masked_fill(~visible, -1.0)
    picks = score.topk(min(spec.topk, n), -1).indices  # the visible positions first, in random order
    count = torch.clamp(q_pos + 1, max=spec.topk)
    count[1::2] = (count[1::2] + 1) // 2
    idx = torch.full((len(q_pos), spec.topk), -1, dtype=torch.int64, device=device)
    listed = torch.arange(picks.shape[1], device=device)[None, :] < count[:, None]
    idx[:, :picks.shape[1]] = torch.where(listed, picks, -1)
    order = torch.rand(idx.shape, generator=gen, device=device).argsort(-1)
    return idx.gather(1, order).to(torch.int32)


def mla_reference(inputs: MLAInputs, precision: str = "float64", form: str | None = None) -> Reference:
    """The MLA ground truth ("float64": the expanded form) or its low-precision twin ("lowp": the
    form farther from the truth). `form` ("expanded" / "absorbed") asks for one form."""
    if form is None:
        if inputs.truth is None:
            inputs.truth = mla_reference(inputs, "float64", "expanded")
        if precision == "float64":
            return inputs.truth
        truth = inputs.truth.out
        forms = [mla_reference(inputs, precision, f) for f in ("expanded", "absorbed")]
        return max(forms, key=lambda r: float((r.out.double() - truth).abs().max()))
    if form not in ("expanded", "absorbed"):
        raise ValueError(f"form = {form!r}: must be 'expanded' or 'absorbed'")
    spec, h = inputs.spec, inputs.spec.heads
    acc, rnd = precision_of(spec, precision)
    L = h.kv_lora_rank
    w_uk, w_uv = inputs.w_uk.to(acc), inputs.w_uv.to(acc)
    q = inputs.q.to(acc)
    q_nope, q_pe = q[..., :h.qk_nope_head_dim], q[..., h.qk_nope_head_dim:]
    allowed = None if spec.topk is None else inputs.allowed()  # sparse: exactly the listed keys

    def latents(rows):  # [B, C, L + R] as the cache holds them, in the kernel's dtype
        return rnd(latent_values(inputs.stored(rows), spec, inputs.kv_scale, acc))

    if form == "expanded":
        def keys(rows):
            # Rows past a sequence's end repeat other rows: each distinct latent is expanded once.
            distinct, where = torch.unique(rows, return_inverse=True)
            lat = latents(distinct)
            k_nope = rnd(torch.einsum("nl,lhp->nhp", lat[:, :L], w_uk))
            k = torch.cat([k_nope, lat[:, None, L:].expand(-1, h.num_q_heads, -1)], -1)
            return k[where], rnd(torch.einsum("nl,lhv->nhv", lat[:, :L], w_uv))[where]

        out, lse = attend(spec, q, keys, inputs.kv_start_loc, h.num_q_heads, h.v_head_dim, rnd, allowed=allowed)
    else:
        def keys(rows):
            lat = latents(rows)[:, :, None]  # one KV head
            return lat, lat[..., :L]

        q_abs = torch.cat([rnd(torch.einsum("thp,lhp->thl", q_nope, w_uk)), q_pe], -1)
        o_lat, lse = attend(spec, q_abs, keys, inputs.kv_start_loc, 1, L, rnd, allowed=allowed)
        out = torch.einsum("thl,lhv->thv", rnd(o_lat), w_uv)
    return Reference(out=out if precision == "float64" else out.to(spec.dtype), lse=lse)


# Helpers for MLA adapters (vLLM's MLA backends do the same): split a batch into its decode and
# prefill paths, read a sequence's latents through its block table, fold W_UK into the queries
# and W_UV into the output around a latent-space kernel.

@dataclass
class BatchPart:
    """The sequences of a case that take one path, as their own batch."""

    seqs: torch.Tensor  # [b] int64: which sequences of the case
    rows: torch.Tensor  # [t] int64: their query / output rows in the case
    seq_lens: torch.Tensor  # [b] int32
    query_start_loc: torch.Tensor  # [b + 1] int32, into the part's own rows
    block_table: torch.Tensor  # [b, max_blocks] int32
    max_query_len: int


def split_batch(case: MLACase, threshold: int, uniform: bool) -> tuple[BatchPart | None, BatchPart | None]:
    """(decode, prefill): sequences with at most `threshold` new tokens, and the rest. `uniform`:
    the decode kernel takes one query length per batch, so (vLLM's require_uniform) only sequences
    with the first decode sequence's length decode."""
    qsl = case.query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    decode = q_lens <= threshold
    if uniform and decode.any():
        decode &= q_lens == q_lens[decode][0]
    return _part(case, torch.nonzero(decode).flatten(), q_lens), _part(case, torch.nonzero(~decode).flatten(), q_lens)


def _part(case: MLACase, seqs: torch.Tensor, q_lens: torch.Tensor) -> BatchPart | None:
    if not seqs.numel():
        return None
    lens = q_lens[seqs]
    starts = case.query_start_loc.long()[seqs]
    local = torch.arange(int(lens.sum()), device=seqs.device)
    first = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    rows = torch.repeat_interleave(starts, lens) + local - first
    qsl = torch.zeros(seqs.numel() + 1, dtype=torch.int32, device=seqs.device)
    qsl[1:] = torch.cumsum(lens, 0)
    return BatchPart(seqs, rows, case.seq_lens[seqs], qsl, case.block_table[seqs], int(lens.max()))


def gather_latents(case: MLACase, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """Sequence `seq`'s latents [n, L + R] read through its block table, dequantized to `dtype`."""
    bs = case.latent_cache.shape[1]
    pos = torch.arange(int(case.seq_lens[seq]), device=case.device)
    return latent_values(case.latent_cache[case.block_table[seq, pos // bs].long(), pos % bs], case.spec,
                         case.kv_scale, dtype)


def sparse_slots(case: MLACase) -> torch.Tensor:
    """Each query's listed tokens as cache slots [T, topk] int64 (block_table[seq, pos // bs] * bs +
    pos % bs; -1 stays -1), as vLLM's convert_req_index_to_global_index gives a sparse kernel."""
    bs, qsl = case.latent_cache.shape[1], case.query_start_loc.long()
    seq = torch.repeat_interleave(torch.arange(len(qsl) - 1, device=qsl.device), qsl[1:] - qsl[:-1])
    idx = case.topk_indices.long()
    pos = idx.clamp(min=0)
    return torch.where(idx >= 0, case.block_table[seq[:, None], pos // bs].long() * bs + pos % bs, -1)


def project(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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


def absorb_queries(case: MLACase, q: torch.Tensor) -> torch.Tensor:
    """Queries [t, H, P + R] in the absorbed form [t, H, L + R]: q_nope through W_UK, in the case's dtype."""
    P = case.spec.heads.qk_nope_head_dim
    return torch.cat([project("thp,lhp->thl", q[..., :P], case.w_uk), q[..., P:]], -1)


def up_project(case: MLACase, o_lat: torch.Tensor) -> torch.Tensor:
    """Latent outputs [t, H, L] through W_UV: [t, H, V]."""
    return project("thl,lhv->thv", o_lat.to(case.spec.dtype), case.w_uv)
