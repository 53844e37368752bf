"""Declared compute precision (Capabilities.fp32_precision): an fp32 case is judged as fp32 unless
the backend declares its matmuls run on TF32 operands; then against a reference whose matmuls do the
same (reference.to_tf32), so a real bug still fails. Undeclared TF32 is its own failure category.
A torch adapter stands in for the kernels here (CPU: Triton's interpreter ignores input_precision);
test_triton_mutants.py holds our Triton kernel's TF32 mutant, on a GPU."""
import dataclasses

import pytest
import torch

from conformance import Capabilities, Runner, Status, register_backend
from conformance.reference import to_tf32
from conformance.registry import RegistryError
from conformance.result import Category
from conformance.fixtures import CATALOG
from mutants import PagedTorch

FP32 = [c for c in CATALOG.cases("cpu", ["mixed_small", "chunked_context_prefill", "small_decode"], kind="mha")
        if c.dtype == torch.float32 and c.calls == "one" and c.block_size == 16]  # 57 cases, every variant


class DeclaresTF32(PagedTorch):
    capabilities = dataclasses.replace(PagedTorch.capabilities, fp32_precision="tf32")


class ScaleOffDeclaresTF32(DeclaresTF32):
    """TF32 declared, and a real bug beside it: the softmax scale 0.5 % off (queries scaled)."""

    def run(self, case):
        return super().run(dataclasses.replace(case, q=case.q * 1.005))


def test_to_tf32_keeps_ten_mantissa_bits():
    x = torch.tensor([1 + 2 ** -10, 1 + 2 ** -11, -(1 + 2 ** -10 + 2 ** -11), 3.0e-30])
    assert to_tf32(x).tolist() == [1 + 2 ** -10, 1.0, -(1 + 2 ** -10), to_tf32(torch.tensor(3.0e-30)).item()]
    assert (to_tf32(torch.randn(1000)).view(torch.int32) & 0x1FFF == 0).all()


def test_undeclared_tf32_fails_with_its_own_category(record_property):
    record_property("mutant", "mutant-tf32-matmuls")
    runner = Runner("cpu")
    results = [runner.run(PagedTorch("tf32_matmuls"), spec) for spec in FP32]
    assert FP32 and all(r.status == Status.FAIL for r in results), [(r.id, r.status) for r in results]
    for r in results:
        assert Category.FP32_AT_TF32 in r.categories and Category.WRONG_OUTPUT not in r.categories, r.reason
        assert r.reason.startswith("fp32 computed at TF32 precision (within TF32's noise); declare "
                                   "Capabilities.fp32_precision = 'tf32'"), r.reason


def test_declared_tf32_is_judged_against_tf32_noise():
    runner = Runner("cpu")
    tf32 = DeclaresTF32("tf32_matmuls")
    results = [runner.run(tf32, spec) for spec in FP32]
    assert all(r.status == Status.PASS and r.noise == "tf32" for r in results), [(r.id, r.reason) for r in results]
    strict = [runner.run(PagedTorch(), spec) for spec in FP32]  # the noise it is judged against is TF32's
    assert all(t.ref_err > 100 * s.ref_err for t, s in zip(results, strict))
    # fp16 and bf16 cases are judged as before
    half = next(c for c in CATALOG.cases("cpu", ["mixed_small"], kind="mha") if c.dtype == torch.float16)
    assert runner.run(tf32, half).noise is None


def test_declared_tf32_still_fails_on_a_real_bug(record_property):
    record_property("mutant", "mutant-tf32-declared-scale-off")
    runner = Runner("cpu")
    results = [runner.run(ScaleOffDeclaresTF32("tf32_matmuls"), spec) for spec in FP32]
    assert all(r.status == Status.FAIL and Category.FP32_AT_TF32 not in r.categories for r in results), \
        [(r.id, r.status, r.reason) for r in results if r.status != Status.FAIL][:3]


def test_a_precision_outside_the_vocabulary_is_refused():
    class Fp16Matmuls(PagedTorch):
        name = "fp16-matmuls"
        capabilities = Capabilities(fp32_precision="fp16")

        def __init__(self):
            pass

    with pytest.raises(RegistryError, match=r"Capabilities.fp32_precision = 'fp16': must be one of ieee, tf32"):
        register_backend(Fp16Matmuls())
