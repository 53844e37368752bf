"""Broken variants of our Triton kernels must be caught. Each mutant is the kernel module's source
with one edit, imported as its own module and run by the real adapter on cases that can show
the bug. An edit must apply exactly once: if a refactor moves the line, this test fails rather
than keeping a 'mutant' that is the unbroken kernel."""
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conformance import Runner, Status
from conformance.isolation import IsolatedRunner
from conformance.matrix import default_device
from conformance.result import Category
from conformance.fixtures import CATALOG

pytest.importorskip("triton")
from conformance.backends import triton_kernels, triton_mla_kernels  # noqa: E402
from conformance.backends.mla import MLATriton  # noqa: E402
from conformance.backends.triton_attention import TritonBackend  # noqa: E402

# name: (the bug, source line, its broken form, split-KV variant?, cases that can show it)
MUTANTS = {
    "window_edge": (
        "the sliding window admits the key at distance `window`",
        "visible = visible & (q_pos[:, None] - k_pos[None, :] < window)",
        "visible = visible & (q_pos[:, None] - k_pos[None, :] <= window)",
        False, ["mixed_small-fp16-bs16-gqa4-d128-sw24"]),
    "fp8_scale_ignored": (
        "fp8 key codes read without k_scale",
        "k = (k.to(tl.float32) * k_scale).to(q.dtype)",
        "k = k.to(tl.float32).to(q.dtype)",
        False, ["mixed_small-fp16-bs16-gqa4-d128-kvfp8e4m3"]),
    "last_block_len_wrong": (
        "the last block read as if it were full",
        "key_hi = context_len + last_q + 1 if CAUSAL else seq_len",
        "key_hi = context_len + last_q + 1 if CAUSAL else (seq_len + block_size - 1) // block_size * block_size",
        False, ["encoder_prefill-fp16-bs48-gqa4-d128"]),
    "sink_in_every_segment": (
        "split-KV counts the sink once per segment instead of once",
        "if USE_SINKS and NUM_SEGMENTS == 1:",
        "if USE_SINKS:",
        True, ["small_decode-fp16-bs16-gqa4-d128-sinks"]),
    "cache_write_scale_ignored": (
        "the cache write quantizes x instead of x / v_scale",
        "v = _round_to_e4m3(tl.math.div_rn(v.to(tl.float32), v_scale))",
        "v = _round_to_e4m3(v.to(tl.float32))",
        False, ["small_decode-fp16-bs16-gqa1-d80-kvfp8e4m3"]),
}
# The same for the MLA decode kernel: (the bug, source line, its broken form, cases that can show it).
MLA_MUTANTS = {
    "rope_dropped": (
        "the rope part of the scores (q_pe . k_pe) left out",
        "s += tl.dot(q_pe, tl.trans(kpe), input_precision=DOT_PRECISION)",
        "s += 0.0",
        ["small_decode-fp16-bs16-h16"]),
    "one_key_past_query": (
        "each query also sees the key after it (the next draft token; past the end: poison)",
        "k_ok = k_pos <= q_pos",
        "k_ok = k_pos <= q_pos + 1",
        ["spec_decode_small-fp16-bs16-h16"]),
    "kv_scale_ignored": (
        "fp8 latent codes read without kv_scale",
        "kv = (kv.to(tl.float32) * kv_scale).to(q_lat.dtype)",
        "kv = kv.to(tl.float32).to(q_lat.dtype)",
        ["small_decode-fp16-bs16-h16-kvfp8e4m3"]),
    "one_tile_scale": (
        "a split entry's codes all read with its first tile's scale",
        "+ (c // SCALE_TILE)[None, :],",
        "+ (c * 0)[None, :],",
        ["small_decode-fp16-bs16-h16-kvfp8_ds_mla"]),
}
CASES = {c.id: c for c in CATALOG.cases("cpu")}


def mutant_module(name: str, old: str, new: str, tmp_path: Path, original=triton_kernels):
    source = Path(original.__file__).read_text()
    stem = Path(original.__file__).stem
    assert source.count(old) == 1, f"mutant {name}: {old!r} must occur exactly once in {stem}.py"
    path = tmp_path / f"{stem}_mutant_{name}.py"
    path.write_text(source.replace(old, new))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # @triton.jit reads its function's source through the module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runner():
    # The kernels compiled on a GPU host, interpreted on a CPU one.
    return Runner(default_device())


@pytest.mark.parametrize("name", MUTANTS)
def test_kernel_mutant_is_caught(name, runner, tmp_path, record_property):
    bug, old, new, split, case_ids = MUTANTS[name]
    mutant = TritonBackend(f"triton-mutant-{name}", split, kernels=mutant_module(name, old, new, tmp_path))
    record_property("mutant", mutant.name)
    real = TritonBackend("triton-real", split)
    for spec in (CASES[i] for i in case_ids):
        assert runner.run(real, spec).status == Status.PASS, spec.id  # the case itself is sound
        result = runner.run(mutant, spec)
        assert result.status == Status.FAIL, f"{name} ({bug}) not caught on {spec.id}: {result.status} {result.reason}"


@pytest.mark.parametrize("name", MLA_MUTANTS)
def test_mla_kernel_mutant_is_caught(name, runner, tmp_path, record_property):
    bug, old, new, case_ids = MLA_MUTANTS[name]
    mutant = MLATriton(kernels=mutant_module(name, old, new, tmp_path, triton_mla_kernels))
    mutant.name = f"mla-triton-mutant-{name}"
    record_property("mutant", mutant.name)
    for spec in (CASES[i] for i in case_ids):
        assert runner.run(MLATriton(), spec).status == Status.PASS, spec.id  # the case itself is sound
        result = runner.run(mutant, spec)
        assert result.status == Status.FAIL, f"{name} ({bug}) not caught on {spec.id}: {result.status} {result.reason}"


class Int32BlockOffsets(TritonBackend):
    """Block ids left int32, so block x page stride wraps past 2^31 elements. Built where it runs: in
    an isolated worker, since a wrapped offset may fault the GPU (an illegal address is a CRASH)."""

    EDIT = ("mask=k_ok, other=0).to(tl.int64)", "mask=k_ok, other=0)")

    def __init__(self, directory):
        super().__init__("triton-mutant-int32-block-offsets", split=False)
        self.directory = str(directory)

    def kernels(self):
        if self._kernels is None:
            self._kernels = mutant_module("int32_block_offsets", *self.EDIT, Path(self.directory))
        return self._kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="far-pages cases need the compiled kernel: under the "
                    "interpreter a wrapped offset reads wild host memory")
def test_int32_block_offsets_are_caught_on_far_pages(tmp_path, record_property):
    record_property("mutant", "triton-mutant-int32-block-offsets")
    specs = [c for c in CATALOG.cases("gpu", ["medium_decode", "mixed_medium"]) if c.far_pages
             and c.dtype == torch.bfloat16 and c.block_size == 16 and c.kv_dtype == "auto"]
    with IsolatedRunner("cuda") as runner:
        for spec in specs:
            assert runner.run(TritonBackend("triton-real", False), spec).status == Status.PASS, spec.id
            result = runner.run(Int32BlockOffsets(tmp_path), spec)
            assert result.status in (Status.FAIL, Status.CRASH), f"not caught on {spec.id}: {result.status}"


class _DeclaresTF32(TritonBackend):
    capabilities = dataclasses.replace(TritonBackend.capabilities, fp32_precision="tf32")


class _DeclaresTF32ScaleOff(_DeclaresTF32):
    """TF32 declared, and the softmax scale 0.5 % off (queries scaled)."""

    def run(self, case):
        return super().run(dataclasses.replace(case, q=case.q * 1.005))


TF32_CASES = [c for c in CATALOG.cases("gpu", ["mixed_medium", "small_decode", "chunked_context_prefill"], kind="mha")
              if c.dtype == torch.float32 and c.calls == "one" and c.block_size == 16 and c.kv_dtype == "auto"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's interpreter ignores tl.dot's input_precision "
                    "(a numpy matmul in fp32): TF32 shows on a GPU only (CPU: test_precision.py)")
@pytest.mark.parametrize("spec", TF32_CASES, ids=[c.id for c in TF32_CASES])  # one case a test: xdist spreads them
def test_tf32_dots_are_their_own_failure_unless_declared(spec, tmp_path, runner, record_property):
    """Our kernel with Triton's default tl.dot on fp32 inputs (TF32) fails the fp32 rule as
    fp32-at-tf32; declared TF32 it passes; declared TF32 with a 0.5 % scale error it fails."""
    record_property("mutant", "triton-mutant-tf32-dots")
    kernels = mutant_module("tf32_dots", 'DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",',
                            'DOT_PRECISION="tf32",', tmp_path)  # the same source each time: Triton's cache has it
    undeclared = TritonBackend("triton-mutant-tf32-dots", False, kernels=kernels)
    declared = _DeclaresTF32("triton-tf32-declared", False, kernels=kernels)
    scale_off = _DeclaresTF32ScaleOff("triton-tf32-declared-scale-off", False, kernels=kernels)
    result = runner.run(undeclared, spec)
    assert result.status == Status.FAIL and Category.FP32_AT_TF32 in result.categories, (spec.id, result.reason)
    assert Category.WRONG_OUTPUT not in result.categories, (spec.id, result.reason)
    result = runner.run(declared, spec)
    assert result.status == Status.PASS and result.noise == "tf32", (spec.id, result.reason)
    result = runner.run(scale_off, spec)
    assert result.status == Status.FAIL and Category.FP32_AT_TF32 not in result.categories, (spec.id, result.reason)
