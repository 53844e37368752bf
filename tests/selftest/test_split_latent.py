"""Split latent caches (spec.SPLIT_LATENT: fp8_ds_mla and its kin): the bytes of an entry as vLLM lays
them out and FlashMLA reads them, the scales and codes to the bit, and the rules of a case."""
import pytest
import torch

from conformance import BatchSpec, CaseSpec, MLAHeads, SpecError
from conformance.mla import latent_values, store_latent

DEEPSEEK = MLAHeads(16)


def _spec(kv_dtype, dtype=torch.bfloat16, heads=DEEPSEEK):
    return CaseSpec("t", BatchSpec([8], [1]), heads, dtype, 16, kv_dtype=kv_dtype)


def _latents(n=5, dtype=torch.bfloat16):
    x = torch.randn(n, DEEPSEEK.latent_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, :128] *= 100  # tiles of very different ranges: one scale for all would flatten the small ones
    return x


def test_fp8_ds_mla_entries_are_vllms_656_bytes():
    """vLLM's layout (its XPU test decodes it this way): 512 fp8 codes, 4 fp32 scales, 64 bf16 rope values."""
    spec, x = _spec("fp8_ds_mla"), _latents()
    entries = store_latent(x, spec, 1.0)
    assert entries.dtype == torch.uint8 and entries.shape == (5, 656) == (5, spec.cache_bytes_per_token)
    codes = entries[:, :512].view(torch.float8_e4m3fn).float()
    scales = entries[:, 512:528].contiguous().view(torch.float32)
    rope = entries[:, 528:].contiguous().view(torch.bfloat16)
    # Each tile's scale is its amax / 448 in fp32, its codes round(kv_c / scale).
    tiles = x[:, :512].float().view(5, 4, 128)
    assert torch.equal(scales, (tiles.abs().amax(-1).double() / 448).float())
    assert torch.equal(codes.view(5, 4, 128), (tiles.double() / scales.double()[..., None]).float()
                       .to(torch.float8_e4m3fn).float())
    assert torch.equal(rope.view(torch.int16), x[:, 512:].view(torch.int16))  # k_pe kept bit for bit
    decoded = (codes.view(5, 4, 128).double() * scales.double()[..., None]).view(5, 512)
    assert torch.equal(latent_values(entries, spec, 1.0, torch.float64), torch.cat([decoded, rope.double()], 1))
    assert (decoded - x[:, :512].double()).abs().max() / x[:, :512].abs().max() < 2 ** -3  # within fp8 rounding


def test_e8m0_scales_are_powers_of_two_that_keep_every_code_in_range():
    entries = store_latent(_latents(), _spec("fp8_ds_mla_e8m0"), 1.0)
    scales = entries[:, 512:528].contiguous().view(torch.float32)
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)
    assert entries[:, :512].view(torch.float8_e4m3fn).float().abs().max() <= 448


def test_a_per_entry_scale_is_one_scale_for_the_whole_kv_c():
    spec = _spec("fp8_ds_mla_entry", torch.float16)
    entries = store_latent(_latents(dtype=torch.float16), spec, 1.0)
    assert entries.shape == (5, 512 + 4 + 128) and spec.cache_bytes_per_token == 644


@pytest.mark.parametrize("kv_dtype, changes, message", [
    ("fp8_ds_mla", dict(dtype=torch.float32), "must be 16-bit"),
    ("fp8_ds_mla", dict(heads=MLAHeads(2, kv_lora_rank=64)), "kv_lora_rank 64 must be a multiple"),
    ("fp8_ds_mla_entry", dict(heads=MLAHeads(2, kv_lora_rank=64)), None),  # one tile: any rank
])
def test_split_latent_rules(kv_dtype, changes, message):
    if message is None:
        _spec(kv_dtype, **changes)
        return
    with pytest.raises(SpecError, match=f"CaseSpec.kv_dtype = '{kv_dtype}': .*{message}"):
        _spec(kv_dtype, **changes)


def test_a_dense_case_has_no_split_cache():
    from conformance import HeadConfig

    with pytest.raises(SpecError, match="a split latent cache needs MLAHeads"):
        CaseSpec("t", BatchSpec([8], [1]), HeadConfig(4, 2, 64), torch.bfloat16, 16, kv_dtype="fp8_ds_mla")
