"""Our Triton entry points name the field, the value and the rule when handed bad input."""
import pytest
import torch

pytest.importorskip("triton")
from conformance.backends.triton_kernels import paged_attention, write_cache  # noqa: E402

Q = torch.zeros(2, 4, 64, dtype=torch.float16)
CACHE = torch.zeros(3, 16, 2, 64, dtype=torch.float16)


@pytest.mark.parametrize("cache, kwargs, message", [
    (CACHE, dict(num_segments=3), "num_segments = 3: must be a power of two"),
    (CACHE.float(), {}, "k_cache.dtype = torch.float32: must be q's dtype"),
    (torch.zeros(3, 16, 3, 64, dtype=torch.float16), {}, "k_cache.shape[2] = 3: must divide the query heads (4)"),
    (torch.zeros(3, 16, 2, 32, dtype=torch.float16), {}, "head_dim = 64: must be <= 256 and the same"),
])
def test_paged_attention_names_bad_input(cache, kwargs, message):
    with pytest.raises(ValueError, match=r"paged_attention: " + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        paged_attention(Q, cache, cache, None, None, None, 1, Q, scale=1.0, **kwargs)


@pytest.mark.parametrize("k_new, v_cache, message", [
    (torch.zeros(4, 2, 64, dtype=torch.float16).transpose(0, 1), CACHE, "k_new/v_new = strided: must be contiguous"),
    (torch.zeros(2, 2, 64, dtype=torch.float16), CACHE.transpose(1, 2).contiguous().transpose(1, 2),
     r"v_cache.stride\(\) = \(2048, 64, 1024, 1\): must equal k_cache.stride\(\)"),
])
def test_write_cache_names_bad_input(k_new, v_cache, message):
    with pytest.raises(ValueError, match="write_cache: " + message):
        write_cache(k_new, k_new, CACHE, v_cache, torch.zeros(2, dtype=torch.int64))


def test_interpreter_rules_skip_with_their_reasons(monkeypatch):
    """On a CPU: no interpreter, no run; bf16 never; wide batches plain only. A missing numpy
    makes every interpreted case a SKIP naming it, not an ERROR."""
    from conformance.triton_rules import interpreter_refuses, no_triton_here
    from conformance.fixtures import CATALOG

    cpu = torch.device("cpu")
    cases = {c.id: c for c in CATALOG.cases("cpu", ["ragged_many_small", "mixed_small"], kind="mha")}
    wide, narrow = "ragged_many_small-fp16-bs16-gqa4-d128", "mixed_small-fp16-bs16-gqa4-d128"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreter_refuses(cases[wide], cpu) is None and interpreter_refuses(cases[narrow + "-sw24"], cpu) is None
    assert "more than 16 sequences or 128 new tokens runs plain only" in interpreter_refuses(cases[wide + "-sw24"], cpu)
    assert "raw bits" in interpreter_refuses(cases[narrow.replace("fp16", "bf16")], cpu)
    at48 = narrow.replace("-bs16-", "-bs48-")
    assert interpreter_refuses(cases[at48], cpu) is None
    assert "variants run at block size 16 only" in interpreter_refuses(cases[at48 + "-sw24"], cpu)
    assert interpreter_refuses(cases[wide + "-sw24"], torch.device("cuda")) is None
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "numpy" else object())
    assert "numpy is not installed" in no_triton_here()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "need Triton's interpreter" in interpreter_refuses(cases[narrow], cpu)
