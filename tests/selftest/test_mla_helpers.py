"""The public helpers an MLA adapter builds on (conformance.mla): a batch split by path, the
latents read through the block table, and the absorbed form around a latent-space kernel."""
import torch

from conformance import (BatchSpec, CaseSpec, MLAHeads, absorb_queries, gather_latents, make_inputs, split_batch,
                         up_project)

SPEC = CaseSpec("t", BatchSpec([9, 20, 3, 7], [1, 6, 3, 1]), MLAHeads(2, kv_lora_rank=32, qk_rope_head_dim=16,
                                                                    qk_nope_head_dim=8, v_head_dim=8),
                torch.float32, 4)


def _case():
    inputs = make_inputs(SPEC, "cpu", 0)
    return inputs, inputs.materialize()


def test_split_batch_gives_every_row_to_one_path():
    _, case = _case()
    decode, prefill = split_batch(case, threshold=3, uniform=False)
    assert decode.seqs.tolist() == [0, 2, 3] and prefill.seqs.tolist() == [1]
    assert sorted(decode.rows.tolist() + prefill.rows.tolist()) == list(range(case.q.shape[0]))
    assert decode.query_start_loc.tolist() == [0, 1, 4, 5] and decode.max_query_len == 3
    uniform, rest = split_batch(case, threshold=3, uniform=True)  # one query length per decode batch
    assert uniform.seqs.tolist() == [0, 3] and rest.seqs.tolist() == [1, 2]


def test_gather_latents_reads_the_context_through_the_block_table():
    inputs, case = _case()
    lat = gather_latents(case, 1, torch.float32)
    context = inputs.kv_start_loc[1] + torch.arange(20 - 6)
    torch.testing.assert_close(lat[:14], inputs.latent[context], rtol=0, atol=0)


def test_absorbed_scores_and_outputs_equal_the_expanded_ones():
    _, case = _case()
    h, L = SPEC.heads, SPEC.heads.kv_lora_rank
    lat = torch.randn(5, h.latent_dim)
    q = case.q
    k = torch.cat([torch.einsum("nl,lhp->nhp", lat[:, :L], case.w_uk), lat[:, None, L:].expand(-1, h.num_q_heads, -1)], -1)
    torch.testing.assert_close(torch.einsum("thd,nd->thn", absorb_queries(case, q), lat),
                               torch.einsum("thd,nhd->thn", q, k), rtol=1e-5, atol=1e-5)
    o_lat = torch.randn(q.shape[0], h.num_q_heads, L)
    torch.testing.assert_close(up_project(case, o_lat), torch.einsum("thl,lhv->thv", o_lat, case.w_uv))
