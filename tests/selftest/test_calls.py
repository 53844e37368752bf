"""Many calls on one cache (conformance/calls.py, modes/): the calls cover every new token once,
in order; a call over part of a batch is the batch's own data; a graph's replays are loaded into the
captured tensors, padded; the specs and declarations are checked."""
import pytest
import torch

from conformance import BatchSpec, CaseSpec, HeadConfig, SpecError, make_inputs
from conformance.calls import call_spec, sub_case, token_rows
from conformance.modes import MODES
from conformance.modes.graph import PAD_SLOT, load, replays
from conformance.modes.invariance import variants
from conformance.modes.paths import CHUNK_SIZES
from conformance.paged import bits
from conformance.registry import Backend, Capabilities, RegistryError, register_backend
from conformance.runner import Runner, Status
from conformance.tolerance import ulp_difference

BATCH = BatchSpec([40, 9, 70, 0, 5], [12, 9, 1, 0, 5])
SPEC = CaseSpec("t", BATCH, HeadConfig(4, 2, 16), torch.float16, 8)


@pytest.mark.parametrize("calls", ["chunks", "tokens"])
def test_a_path_brings_every_new_token_once_in_order(calls):
    seen = {b: [] for b in range(BATCH.batch_size)}
    for step in MODES[calls].steps(BATCH):
        assert len({p.seq for p in step}) == len(step)  # a sequence at most once per call
        for p in step:
            assert p.first == len(seen[p.seq]) and p.count >= 1
            # a chunk of one of the sizes, or the sequence's last tokens
            assert p.count in (CHUNK_SIZES if calls == "chunks" else (1,)) or p.first + p.count == BATCH.query_lens[p.seq]
            seen[p.seq] += range(p.first, p.first + p.count)
    assert all(seen[b] == list(range(q)) for b, q in enumerate(BATCH.query_lens))


def test_a_chunked_call_mixes_decode_steps_and_prefill_chunks():
    first = MODES["chunks"].steps(BATCH)[0]
    assert {p.count for p in first} == {1, 7, 5}  # sizes start staggered: 1, 7, 64 (capped by the tokens left)


def test_a_call_over_part_of_the_batch_is_that_part():
    inputs = make_inputs(SPEC, "cpu", 0)
    case = inputs.materialize()
    picks = variants(BATCH)["padded"]
    part = sub_case(case, picks)
    assert part.spec.batch == call_spec(SPEC, picks).batch
    assert part.spec.batch.seq_lens == (0, 40, 0, 9, 0, 70, 0, 5, 0)
    rows = token_rows(case, picks)
    assert torch.equal(part.q, case.q[rows]) and torch.equal(part.k_new, case.k_new[rows])
    assert torch.equal(part.slot_mapping, case.slot_mapping[rows])
    assert part.k_cache is case.k_cache  # the same cache: what one call writes, the next reads
    assert torch.equal(part.block_table[1], case.block_table[0]) and not part.block_table[0].any()
    assert part.out.isnan().all() and part.out.shape[0] == rows.numel()
    mid = sub_case(case, MODES["tokens"].steps(BATCH)[5])  # the sixth token of sequence 0 sees 28 + 5 earlier tokens
    assert mid.spec.batch.seq_lens[0] == 28 + 6 and mid.spec.batch.query_lens[0] == 1


def test_calls_need_a_causal_case_and_a_known_name():
    with pytest.raises(SpecError, match="CaseSpec.calls = 'chunks': needs a causal case"):
        SPEC.replace(causal=False, calls="chunks")
    with pytest.raises(SpecError, match="CaseSpec.calls = 'twice': must be one of"):
        SPEC.replace(calls="twice")
    assert SPEC.replace(causal=False, calls="invariance").id.endswith("-invariance")


def test_bit_exact_declarations_are_checked_at_registration():
    class Loud(Backend):
        name = "loud-bit-exact"
        capabilities = Capabilities(bit_exact=frozenset({"batch", "always"}))

        def run(self, case):
            return case.out

    with pytest.raises(RegistryError, match=r"bit_exact = \['always', 'batch'\]: \['always'\] unknown"):
        register_backend(Loud)


def test_ulp_difference_is_at_the_outputs_scale():
    a = torch.tensor([1.0, 0.5, 1e-4], dtype=torch.float16)
    assert ulp_difference(a, a.clone()) == 0
    assert ulp_difference(a + torch.tensor([0, 0, 1e-6], dtype=torch.float16), a) == 1  # noise near 0: not 1000s
    b = a.clone()
    b[0] = 1.0 + 3 * 2.0 ** -10
    assert ulp_difference(b, a) == 3


def test_a_decode_only_backend_runs_a_prefill_token_by_token():
    """Its max_query_len refuses one call over the batch, not the decode replay: that is judged
    against the truth, and the comparison with one call is left out with the reason."""
    import conformance.backends  # noqa: F401 - registers sdpa
    from conformance import get_backend

    class DecodeOnly(type(get_backend("sdpa"))):
        pass

    b = DecodeOnly("decode-only", None)
    b.capabilities = Capabilities(max_query_len=1, features=frozenset({"causal", "empty_sequences"}))
    runner = Runner("cpu")
    spec = SPEC.replace(calls="tokens")
    assert runner.run(b, SPEC).status == Status.SKIP
    result = runner.run(b, spec)
    assert result.status == Status.PASS, result.reason
    assert "not compared with one call" in result.reason and result.calls_ulp is None
    chunks = runner.run(b, SPEC.replace(calls="chunks"))
    assert chunks.status == Status.SKIP and chunks.reason.startswith("call 1 of ")


def test_a_graph_is_replayed_on_new_lengths_and_on_a_padded_batch():
    got = replays(BATCH)
    assert got["reversed"].seq_lens == (5, 0, 70, 9, 40)  # every slot a new length
    assert got["padded"] == BatchSpec([40, 9, 70, 0, 0], [12, 9, 1, 0, 0])  # the tail: padding slots


def test_a_replay_is_loaded_into_the_captured_tensors_padded():
    """Its data in the leading part of each captured tensor, and past it: poison token rows, a NaN
    output, no slot, the null block, length 0, poisoned blocks."""
    static = make_inputs(SPEC.replace(calls="graph"), "cpu", 0).materialize()
    padded = CaseSpec("t", replays(BATCH)["padded"], SPEC.heads, SPEC.dtype, 8)
    replay = make_inputs(padded, "cpu", 1).materialize()
    view = load(static, replay)
    t, blocks = replay.q.shape[0], padded.pool_blocks
    assert view.q.data_ptr() == static.q.data_ptr() and torch.equal(view.q, replay.q)
    assert static.q[t:].isnan().all() and static.out.isnan().all()
    assert (static.slot_mapping[t:] == PAD_SLOT).all()
    assert torch.equal(static.seq_lens, replay.seq_lens) and torch.equal(static.query_start_loc, replay.query_start_loc)
    assert (static.block_table[:, replay.block_table.shape[1]:] == 0).all()
    assert torch.equal(bits(view.k_cache), bits(replay.k_cache)) and static.k_cache[blocks:].isnan().all()
    with pytest.raises(SpecError, match=r"graph replay: q \(27, 4, 16\) does not fit the captured \(22, 4, 16\)"):
        load(replay, static)  # the whole batch into the half one's tensors


def test_graph_cases_and_declarations_are_checked():
    with pytest.raises(SpecError, match="a graph case's batch needs 2 sequences or more"):
        SPEC.replace(calls="graph", batch=BatchSpec([9], [1]))

    class Captures(Backend):
        name = "captures-without-padding"
        capabilities = Capabilities(cuda_graphs=True)

        def run(self, case):
            return case.out

    with pytest.raises(RegistryError, match="cuda_graphs needs 'empty_sequences' in features"):
        register_backend(Captures)
    import conformance.backends  # noqa: F401 - registers sdpa
    from conformance import get_backend

    result = Runner("cpu").run(get_backend("sdpa"), SPEC.replace(calls="graph"))
    assert result.status == Status.SKIP and "no CUDA-graph replay (Capabilities.cuda_graphs)" in result.reason
