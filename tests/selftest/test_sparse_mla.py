"""Sparse MLA cases (CaseSpec.topk): index lists as an indexer gives them, and a reference that
attends exactly the listed tokens."""
import dataclasses

import pytest
import torch

from conformance import BatchSpec, CaseSpec, HeadConfig, MLAHeads, SpecError, make_inputs, sparse_slots
from conformance.mla import mla_reference

HEADS = MLAHeads(2, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=8, v_head_dim=8)
BATCH = BatchSpec([40, 9, 70], [1, 6, 12])  # contexts 39, 3, 58


def _inputs(topk, batch=BATCH):
    return make_inputs(CaseSpec("t", batch, HEADS, torch.float32, 8, topk=topk), "cpu", 0)


@pytest.mark.parametrize("topk", [4, 64])  # below every context; past every context
def test_each_list_names_distinct_visible_positions_full_or_half_full(topk):
    inputs = _inputs(topk)
    idx = inputs.topk_indices.long()
    q_pos = torch.cat([torch.arange(c, c + q) for c, q in zip(BATCH.context_lens, BATCH.query_lens)])
    assert idx.shape == (BATCH.num_query_tokens, topk)
    for t, row in enumerate(idx):
        listed = row[row >= 0]
        assert len(set(listed.tolist())) == len(listed) and (listed <= q_pos[t]).all()
        full = min(topk, int(q_pos[t]) + 1)
        assert len(listed) == (full if t % 2 == 0 else (full + 1) // 2)
    assert any((row[:-1] < 0).any() and (row[1:] >= 0).any() for row in idx)  # padding anywhere in a list


def test_the_reference_attends_exactly_the_listed_tokens():
    """Every visible position listed: the dense causal truth. Then drop a key from one list: only
    that query's output moves."""
    inputs = _inputs(128)
    q_pos = torch.cat([torch.arange(c, c + q) for c, q in zip(BATCH.context_lens, BATCH.query_lens)])
    every = torch.where(torch.arange(128)[None, :] <= q_pos[:, None], torch.arange(128)[None, :], -1)
    full = dataclasses.replace(inputs, topk_indices=every.int(), truth=None)
    dense = dataclasses.replace(inputs, spec=inputs.spec.replace(topk=None), topk_indices=None, truth=None)
    assert torch.allclose(mla_reference(full).out, mla_reference(dense).out, atol=1e-12)
    fewer = every.clone()
    fewer[5, 0] = -1
    cut = mla_reference(dataclasses.replace(inputs, topk_indices=fewer.int(), truth=None)).out
    moved = (cut - mla_reference(full).out).abs().amax((1, 2)) > 1e-9
    assert moved.tolist() == [t == 5 for t in range(len(every))]


def test_sparse_slots_look_positions_up_in_their_own_requests_table():
    inputs = _inputs(16)
    case = inputs.materialize()
    slots, idx = sparse_slots(case), case.topk_indices.long()
    t, j = 8, int((idx[8] >= 0).nonzero()[0])  # a query of request 2 (rows 7..18)
    pos = int(idx[t, j])
    assert slots[t, j] == case.block_table[2, pos // 8] * 8 + pos % 8
    assert ((slots < 0) == (idx < 0)).all()


@pytest.mark.parametrize("changes, message", [
    (dict(topk=0), "CaseSpec.topk = 0: must be None or an int >= 1"),
    (dict(topk=8, calls="chunks"), "CaseSpec.topk = 8: needs calls='one'"),
    (dict(topk=8, heads=HeadConfig(4, 2, 64)), "CaseSpec.topk = 8: must be None in a case whose heads are HeadConfig"),
])
def test_sparse_rules(changes, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CaseSpec(**{**dict(scenario="t", batch=BATCH, heads=HEADS, dtype=torch.float32, block_size=8), **changes})
