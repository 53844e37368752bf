"""Our Triton entry points name the field, the value and the rule when handed bad input."""
import pytest
import torch

pytest.importorskip("triton")
from backends.triton_kernels import paged_attention, write_cache  # noqa: E402

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


def test_write_cache_needs_contiguous_tensors():
    k_new = torch.zeros(4, 2, 64, dtype=torch.float16).transpose(0, 1)
    with pytest.raises(ValueError, match="must be contiguous"):
        write_cache(k_new, k_new, CACHE, CACHE, torch.zeros(2, dtype=torch.int64))
