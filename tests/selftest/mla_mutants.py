"""A plain-torch MLA adapter, written independently of the reference and of backends/mla.py, and its
mutants: each switches on one real MLA bug class. The self-tests assert the suite catches every one.

Per sequence, one new token takes the absorbed path and several take the expanded one, so each
bug that lives in one path is met by the cases of that path."""
from __future__ import annotations

import torch

from conformance import Capabilities, MLABackend, MLACase, scatter_latent
from conformance.paged import quantize
from conformance.spec import KV_DTYPES, SPLIT_LATENT

BUGS = {
    "w_uv_wrong_transpose": "values up-projected before the weighted sum with W_UV's [L, H, V] memory read as [H, L, V]",
    "rope_dropped": "the rope part (q_pe . k_pe) left out of the scores",
    "wrong_scale": "softmax scale 1/sqrt(576) (the absorbed width) instead of 1/sqrt(192)",
    "kv_scale_ignored": "fp8 latent codes read without their scale",
    "block_table_ignored": "latent pages assumed contiguous from the sequence's first block",
    "top_left_causal": "expanded path's causal mask aligned top-left",
    "latent_not_written": "the new tokens' latents never reach the cache",
    "rope_key_not_cached": "the cache write stores kv_c but not k_pe",
    # Split latent caches (fp8_ds_mla ...):
    "one_tile_scale": "the first tile's scale applied to the whole kv_c",
    "rope_quantized": "the cache write rounds k_pe through fp8 (it must stay exact in the case's dtype)",
    "scales_of_previous_token": "each token's codes read with the scales of the token before it",
    # Sparse MLA (index lists):
    "padding_read_as_key_0": "a -1 entry of an index list read as position 0",
    "request_ids_off_by_one": "each request's listed positions looked up in the block table of the request before it",
    "topk_length_from_seq_len": "only the first min(topk, seq_len) entries of a list read, as if its -1s were all "
                                "at the end",
}


class LatentTorch(MLABackend):
    description = "plain torch MLA, per sequence, both forms (self-test adapter)"
    # Graph replays on the CPU only (the prepared call called again: graphs.py), with their padding.
    capabilities = Capabilities(features=frozenset({"causal", "empty_sequences", "sparse"}),
                                kv_dtypes=frozenset(KV_DTYPES), cuda_graphs=True)

    def __init__(self, bug: str | None = None):
        assert bug is None or bug in BUGS, bug
        self.bug = bug
        self.name = f"mla-mutant-{bug.replace('_', '-')}" if bug else "latent-torch"

    def write_cache(self, case: MLACase) -> None:
        if self.bug == "latent_not_written":
            return
        if self.bug == "rope_key_not_cached":
            bs = case.latent_cache.shape[1]
            kv_c = quantize(case.kv_c_new, case.kv_scale, case.latent_cache.dtype)
            case.latent_cache[case.slot_mapping // bs, case.slot_mapping % bs, :kv_c.shape[1]] = kv_c
            return
        scatter_latent(case)
        if self.bug == "rope_quantized" and case.spec.kv_dtype in SPLIT_LATENT:
            bs, rope = case.latent_cache.shape[1], case.k_pe_new.to(torch.float8_e4m3fn).to(case.k_pe_new.dtype)
            rope_bytes = rope.view(torch.uint8).shape[-1]
            case.latent_cache[case.slot_mapping // bs, case.slot_mapping % bs, -rope_bytes:] = rope.view(torch.uint8)

    def _latents(self, case: MLACase, slots: torch.Tensor, kv_scale: float) -> torch.Tensor:
        """The cache's latents at `slots` [n, L + R], float64, decoded here (not by the harness)."""
        bs, L = case.latent_cache.shape[1], case.spec.heads.kv_lora_rank
        raw = case.latent_cache[slots // bs, slots % bs]
        split = SPLIT_LATENT.get(case.spec.kv_dtype)
        if split is None:
            return raw.double() * kv_scale
        tiles = split.tiles(L)
        scales = raw[:, L:L + 4 * tiles].contiguous().view(torch.float32).double()  # [n, tiles]
        if self.bug == "one_tile_scale":
            scales = scales[:, :1].expand(-1, tiles)
        elif self.bug == "scales_of_previous_token":
            scales = scales.roll(1, 0)
        kv_c = raw[:, :L].contiguous().view(torch.float8_e4m3fn).double().view(len(raw), tiles, -1) * scales[..., None]
        k_pe = raw[:, L + 4 * tiles:].contiguous().view(case.spec.dtype).double()
        return torch.cat([kv_c.view(len(raw), L), k_pe], 1)

    def run(self, case: MLACase):
        h, bug = case.spec.heads, self.bug
        L, P = h.kv_lora_rank, h.qk_nope_head_dim
        bs = case.latent_cache.shape[1]
        scale = h.latent_dim ** -0.5 if bug == "wrong_scale" else case.scale
        kv_scale = 1.0 if bug == "kv_scale_ignored" else case.kv_scale
        w_uk, w_uv = case.w_uk.double(), case.w_uv.double()
        # The expanded path's values: [L, H, V]; the bug reads memory laid out [H, L, V] as that.
        w_uv_values = w_uv.permute(1, 0, 2).reshape(w_uv.shape) if bug == "w_uv_wrong_transpose" else w_uv
        qsl = case.query_start_loc.tolist()
        for b, (n, ctx) in enumerate(zip(case.seq_lens.tolist(), case.context_lens.tolist())):
            pos = torch.arange(n)
            first = int(case.block_table[b, 0]) * bs
            table = case.block_table[b - 1 if bug == "request_ids_off_by_one" and case.spec.topk else b]
            if bug == "block_table_ignored":
                slots = (first + pos) % case.latent_cache[:, :, 0].numel()
            else:
                slots = table[pos // bs].long() * bs + pos % bs
            lat = self._latents(case, slots, kv_scale)  # [n, L + R]
            kv_c, k_pe = lat[:, :L], lat[:, L:]
            q = case.q[qsl[b]:qsl[b + 1]].double()
            q_nope, q_pe = q[..., :P], q[..., P:]
            rope = 0.0 if bug == "rope_dropped" else 1.0
            m = q.shape[0]
            qpos = torch.arange(m)[:, None] + (0 if bug == "top_left_causal" and m > 1 else ctx)
            visible = pos[None, :] <= qpos  # [m, n]
            if case.spec.topk is not None:  # exactly the listed positions
                idx = case.topk_indices[qsl[b]:qsl[b + 1]].long()
                if bug == "topk_length_from_seq_len":
                    idx = idx[:, :n]
                elif bug == "padding_read_as_key_0":
                    idx = idx.clamp(min=0)
                listed = torch.zeros(m, n + 1, dtype=torch.bool).scatter_(1, torch.where(idx >= 0, idx, n), True)
                visible = listed[:, :n]
            if m == 1:  # absorbed: over the latents themselves
                q_lat = torch.einsum("mhp,lhp->mhl", q_nope, w_uk)
                s = torch.einsum("mhl,nl->hmn", q_lat, kv_c) + rope * torch.einsum("mhr,nr->hmn", q_pe, k_pe)
                p = torch.softmax((s * scale).masked_fill(~visible, float("-inf")), -1)
                out = torch.einsum("mhl,lhv->mhv", torch.einsum("hmn,nl->mhl", p, kv_c), w_uv)
            else:  # expanded: per-head keys and values
                k_nope = torch.einsum("nl,lhp->nhp", kv_c, w_uk)
                v = torch.einsum("nl,lhv->nhv", kv_c, w_uv_values)
                s = torch.einsum("mhp,nhp->hmn", q_nope, k_nope) + rope * torch.einsum("mhr,nr->hmn", q_pe, k_pe)
                p = torch.softmax((s * scale).masked_fill(~visible, float("-inf")), -1)
                out = torch.einsum("hmn,nhv->mhv", p, v)
            case.out[qsl[b]:qsl[b + 1]] = out.to(case.out.dtype)
        return case.out
