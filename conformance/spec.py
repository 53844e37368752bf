"""What a case is: a batch of sequences, a head layout, a dtype, a block size and features.

Everything here is a frozen, validated value. Bad input raises SpecError naming the field, the
value and the rule, so a malformed scenario never turns into a silently wrong test.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch


class SpecError(ValueError):
    """A scenario, head config or case that breaks a rule of the suite."""


def _require(ok: bool, field: str, value, rule: str) -> None:
    if not ok:
        raise SpecError(f"{field} = {value!r}: {rule}")


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# KV-cache storage types: "auto" stores the cache in the case's dtype; fp8 caches store codes that
# read back as code * scale, with one scale per tensor (k_scale, v_scale).
FP8_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn}


@dataclass(frozen=True)
class SplitLatent:
    """A split latent cache (MLA only; DeepSeek V3.2 / V4 engines), one entry of bytes per token:
    kv_c as fp8 e4m3 codes, then their fp32 scales (one per tile of `tile` values; None: one for the
    whole kv_c), then k_pe in the case's 16-bit dtype, unquantized. A tile's scale is its amax / 448
    (rounded up to a power of two if `pow2_scales`) and its codes round(kv_c / scale)."""

    tile: int | None
    pow2_scales: bool = False

    def tiles(self, kv_lora_rank: int) -> int:
        return kv_lora_rank // self.tile if self.tile else 1

    def entry_bytes(self, heads) -> int:
        return heads.kv_lora_rank + 4 * self.tiles(heads.kv_lora_rank) + 2 * heads.qk_rope_head_dim


SPLIT_LATENT = {
    "fp8_ds_mla": SplitLatent(128),  # vLLM's, read by FlashMLA's sparse kernels: 656 bytes for DeepSeek
    "fp8_ds_mla_e8m0": SplitLatent(128, pow2_scales=True),  # the same with SM100's e8m0 (power-of-two) scales
    "fp8_ds_mla_entry": SplitLatent(None),  # one scale per entry, DeepSeek-V4 style
}
KV_DTYPES = ("auto", "fp8_e4m3", *SPLIT_LATENT)
# How the paged cache lies in memory. "nhd": separate K and V caches [num_blocks, block_size, Hkv, D]
# (vLLM's); "hnd": separate, [num_blocks, Hkv, block_size, D]; "combined_nhd" / "combined_hnd": one
# [num_blocks, 2, ...] tensor holding each page's K then V (FlashInfer's single-tensor form).
KV_LAYOUTS = ("nhd", "hnd", "combined_nhd", "combined_hnd")
# How a case reaches the backend: the name of its call mode (conformance/modes/, whose table holds
# each mode). ONE_CALL, the default: one call over the whole batch. CALL_MODES: each mode's rules,
# name -> check(spec) raising SpecError, which conformance.modes puts here when it is imported
# (importing any part of conformance does), so a CaseSpec is checked by its mode when it is made.
ONE_CALL = "one"
CALL_MODES: dict[str, Callable[["CaseSpec"], None]] = {}
# Which blocks a sequence gets: a random pick from the pool ("shuffled"), or, as schedulers hand
# them out under churn, "interleaved": block ids alternating between the batch's sequences, each
# sequence's in decreasing order (so its new tokens' slots decrease across blocks).
PAGE_ORDERS = ("shuffled", "interleaved")


@dataclass(frozen=True)
class BatchSpec:
    """One batch: per sequence, its total length (context + new tokens) and its new tokens.

    Sequence i holds seq_lens[i] tokens; the last query_lens[i] of them are new this step (their
    K/V are written to the cache by the backend and their queries attend). The rest,
    seq_lens[i] - query_lens[i], is context already in the paged cache. A sequence of length 0
    (and 0 new tokens) is an empty batch slot, as engines pad batches to a captured size.
    """

    seq_lens: tuple[int, ...]
    query_lens: tuple[int, ...]
    # Prefix sharing (prefix caching, GRPO groups): P prompts, each shared by the G = B / P
    # consecutive sequences of its group. Their first shared_prefix_lens[g] tokens are the same
    # context; the prompt's full blocks are the same physical blocks in every member's block table,
    # and a partly filled last prompt block is each member's own copy (copy-on-write already done).
    shared_prefix_lens: tuple[int, ...] = ()

    def __post_init__(self):
        for field in ("seq_lens", "query_lens", "shared_prefix_lens"):
            value = getattr(self, field)
            _require(isinstance(value, (list, tuple)), f"BatchSpec.{field}", value, "must be a list or tuple of ints")
            object.__setattr__(self, field, tuple(value))
        _require(len(self.seq_lens) > 0, "BatchSpec.seq_lens", self.seq_lens, "a batch needs at least one sequence")
        _require(len(self.seq_lens) == len(self.query_lens), "BatchSpec.query_lens", self.query_lens,
                 f"must have one entry per sequence ({len(self.seq_lens)} seq_lens given)")
        for i, (s, q) in enumerate(zip(self.seq_lens, self.query_lens)):
            _require(isinstance(s, int) and not isinstance(s, bool) and s >= 0, f"BatchSpec.seq_lens[{i}]", s,
                     "must be an int >= 0")
            _require(isinstance(q, int) and not isinstance(q, bool) and q >= 0, f"BatchSpec.query_lens[{i}]", q,
                     "must be an int >= 0")
            _require(q <= s, f"BatchSpec.query_lens[{i}]", q, f"must not exceed seq_lens[{i}] = {s}")
            _require(q >= 1 or s == 0, f"BatchSpec.query_lens[{i}]", q,
                     f"must be >= 1 (every sequence brings a new token) unless the sequence is empty (seq_lens[{i}] "
                     f"= {s}, not 0)")
        _require(any(self.seq_lens), "BatchSpec.seq_lens", self.seq_lens, "a batch needs a non-empty sequence")
        if self.shared_prefix_lens:
            groups = len(self.shared_prefix_lens)
            _require(self.batch_size % groups == 0, "BatchSpec.shared_prefix_lens", self.shared_prefix_lens,
                     f"needs one entry per group of equal size: {groups} groups do not divide "
                     f"{self.batch_size} sequences")
            for i, ctx in enumerate(self.context_lens):
                p = self.shared_prefix_lens[i // self.group_size]
                _require(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= ctx,
                         f"BatchSpec.shared_prefix_lens[{i // self.group_size}]", p,
                         f"must be an int from 1 to the context of each sequence of its group (sequence {i}: {ctx})")

    def __repr__(self) -> str:  # the seeds of batches without sharing hash this text: it stays as it was
        sharing = f", shared_prefix_lens={self.shared_prefix_lens!r}" if self.shared_prefix_lens else ""
        return f"BatchSpec(seq_lens={self.seq_lens!r}, query_lens={self.query_lens!r}{sharing})"

    @property
    def group_size(self) -> int:
        """Sequences per shared prompt (1 without sharing)."""
        return self.batch_size // len(self.shared_prefix_lens) if self.shared_prefix_lens else 1

    @property
    def context_lens(self) -> tuple[int, ...]:
        return tuple(s - q for s, q in zip(self.seq_lens, self.query_lens))

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def num_query_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_decode(self) -> bool:
        return max(self.query_lens) == 1

    @property
    def has_empty(self) -> bool:
        """Some sequence has no tokens at all: a padded batch slot (CUDA-graph padding makes these)."""
        return 0 in self.seq_lens


@dataclass(frozen=True)
class Scenario:
    """A named batch shape, at full size ("gpu" profile) and scaled down ("cpu" profile).

    cpu=None marks a scenario that only makes sense at full size (long contexts, wide batches).
    """

    name: str
    gpu: BatchSpec
    cpu: BatchSpec | None
    causal: bool = True
    description: str = ""

    def batch(self, sizes: str) -> BatchSpec | None:
        _require(sizes in ("cpu", "gpu"), "sizes", sizes, "must be 'cpu' (scaled down) or 'gpu' (full size)")
        return self.gpu if sizes == "gpu" else self.cpu


@dataclass(frozen=True)
class HeadConfig:
    """Attention heads of one layer (per tensor-parallel rank). Query head h reads KV head h // group."""

    kind: ClassVar[str] = "mha"  # CaseSpec.kind of a case with these heads (conformance/kinds.py)
    fixed_case_fields: ClassVar[dict] = {"topk": None}  # CaseSpec fields its cases must leave at these values

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    model: str = ""  # where the shape comes from, for people reading the catalog

    def __post_init__(self):
        for field in ("num_q_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, field)
            _require(isinstance(v, int) and v >= 1, f"HeadConfig.{field}", v, "must be an int >= 1")
        _require(self.num_q_heads % self.num_kv_heads == 0, "HeadConfig.num_kv_heads", self.num_kv_heads,
                 f"must divide num_q_heads = {self.num_q_heads}")

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def id(self) -> str:
        return f"gqa{self.group_size}-d{self.head_dim}"

    @property
    def out_dim(self) -> int:
        return self.head_dim

    @property
    def cache_elements_per_token(self) -> int:
        """K and V of every KV head."""
        return 2 * self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class MLAHeads:
    """DeepSeek-style multi-head latent attention of one layer (per tensor-parallel rank).

    The cache keeps one latent per token: kv_c (kv_lora_rank) then the rope key k_pe
    (qk_rope_head_dim), shared by all heads. Head h's key is [kv_c @ W_UK[:, h], k_pe] and its value
    kv_c @ W_UV[:, h]; its query is [q_nope, q_pe] (qk_nope_head_dim + qk_rope_head_dim). As MQA
    over the latent this is one KV head for all query heads (the absorbed form).
    """

    kind: ClassVar[str] = "mla"
    # Causal decoder attention over one latent cache: no variant an MLA kernel would have to know.
    fixed_case_fields: ClassVar[dict] = {"causal": True, "sliding_window": None, "softcap": None, "sinks": False,
                                         "kv_layout": "nhd", "logit_std": 1.0, "far_pages": False}

    num_q_heads: int
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    model: str = ""

    def __post_init__(self):
        for field in ("num_q_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            v = getattr(self, field)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"MLAHeads.{field}", v,
                     "must be an int >= 1")

    @property
    def num_kv_heads(self) -> int:
        return 1  # the latent, shared by every query head

    @property
    def head_dim(self) -> int:
        """The query/key head dim of the expanded form (192): the softmax scale derives from it."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Elements per token in the cache (576): kv_c then k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def cache_elements_per_token(self) -> int:
        return self.latent_dim

    @property
    def out_dim(self) -> int:
        return self.v_head_dim

    @property
    def id(self) -> str:
        dims = (self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim)
        return f"h{self.num_q_heads}" + ("" if dims == (512, 64, 128, 128) else "-l{}-r{}-n{}-v{}".format(*dims))


@dataclass(frozen=True)
class CaseSpec:
    """One conformance case, backend-independent. Its id seeds its data. With MLAHeads it is an
    MLA case (kind "mla"): causal, plain, its latent cache in one layout; kv_dtype may be fp8."""

    scenario: str
    batch: BatchSpec
    heads: HeadConfig | MLAHeads
    dtype: torch.dtype
    block_size: int
    causal: bool = True
    sliding_window: int | None = None  # keys visible to a query, itself included: pos_q - pos_k < window
    softcap: float | None = None  # logits -> softcap * tanh(logits / softcap), after the scale
    kv_dtype: str = "auto"
    kv_layout: str = "nhd"
    sinks: bool = False  # one learned logit per query head joins every softmax (no value; not scaled or capped)
    scale: float | None = None  # softmax scale; None means head_dim ** -0.5
    # Adversarial variants. logit_std: queries drawn so that the scaled logits have about this
    # standard deviation (1 normally; 2500 puts the largest near 1e4, where a softmax without its
    # max subtracted overflows). far_pages: the sequences' pages lie past the block where
    # page index x page stride exceeds 2^31 elements (a pool of >= 2^31 elements per cache), where
    # 32-bit offset arithmetic wraps.
    logit_std: float = 1.0
    far_pages: bool = False
    page_order: str = "shuffled"
    calls: str = ONE_CALL  # the call mode (conformance/modes/), which checks the case is one it can run
    # Sparse MLA (DeepSeek V3.2's indexer): each query attends only the keys its index list names,
    # at most topk positions of its sequence (MLACase.topk_indices, -1 padded).
    topk: int | None = None

    def __post_init__(self):
        _require(isinstance(self.batch, BatchSpec), "CaseSpec.batch", self.batch, "must be a BatchSpec")
        _require(isinstance(self.heads, (HeadConfig, MLAHeads)), "CaseSpec.heads", self.heads,
                 "must be a HeadConfig or MLAHeads")
        _require(self.dtype in DTYPE_NAMES, "CaseSpec.dtype", self.dtype, f"must be one of {list(DTYPES.values())}")
        _require(isinstance(self.block_size, int) and self.block_size >= 1, "CaseSpec.block_size", self.block_size,
                 "must be an int >= 1")
        _require(self.kv_dtype in KV_DTYPES, "CaseSpec.kv_dtype", self.kv_dtype, f"must be one of {KV_DTYPES}")
        split = SPLIT_LATENT.get(self.kv_dtype)
        if split:
            _require(isinstance(self.heads, MLAHeads), "CaseSpec.kv_dtype", self.kv_dtype,
                     "a split latent cache needs MLAHeads")
            _require(self.dtype in (torch.float16, torch.bfloat16), "CaseSpec.kv_dtype", self.kv_dtype,
                     f"keeps k_pe in the case's dtype, which must be 16-bit (not {DTYPE_NAMES.get(self.dtype)})")
            _require(not split.tile or self.heads.kv_lora_rank % split.tile == 0, "CaseSpec.kv_dtype", self.kv_dtype,
                     f"has tiles of {split.tile} values: kv_lora_rank {self.heads.kv_lora_rank} must be a multiple")
        _require(self.kv_layout in KV_LAYOUTS, "CaseSpec.kv_layout", self.kv_layout, f"must be one of {KV_LAYOUTS}")
        if self.sliding_window is not None:
            _require(isinstance(self.sliding_window, int) and self.sliding_window >= 1, "CaseSpec.sliding_window",
                     self.sliding_window, "must be None or an int >= 1")
            _require(self.causal, "CaseSpec.sliding_window", self.sliding_window,
                     "needs a causal case (a window is defined backwards from the query)")
        _require(isinstance(self.sinks, bool), "CaseSpec.sinks", self.sinks, "must be True or False")
        if self.softcap is not None:
            _require(self.softcap > 0, "CaseSpec.softcap", self.softcap, "must be None or > 0")
        if self.scale is None:
            object.__setattr__(self, "scale", self.heads.head_dim ** -0.5)
        _require(self.scale > 0, "CaseSpec.scale", self.scale, "must be > 0")
        _require(isinstance(self.logit_std, (int, float)) and self.logit_std > 0, "CaseSpec.logit_std", self.logit_std,
                 "must be a number > 0")
        _require(isinstance(self.far_pages, bool), "CaseSpec.far_pages", self.far_pages, "must be True or False")
        _require(self.page_order in PAGE_ORDERS, "CaseSpec.page_order", self.page_order,
                 f"must be one of {PAGE_ORDERS}")
        if self.topk is not None:
            _require(isinstance(self.topk, int) and not isinstance(self.topk, bool) and self.topk >= 1, "CaseSpec.topk",
                     self.topk, "must be None or an int >= 1")
        for field, plain in self.heads.fixed_case_fields.items():
            _require(getattr(self, field) == plain, f"CaseSpec.{field}", getattr(self, field),
                     f"must be {plain!r} in a case whose heads are {type(self.heads).__name__} ({self.kind})")
        _require(isinstance(self.calls, str) and self.calls in CALL_MODES, "CaseSpec.calls", self.calls,
                 f"must be one of {tuple(CALL_MODES)}")
        CALL_MODES[self.calls](self)  # the call mode's own rules

    @property
    def kind(self) -> str:
        """"mha" (query heads over K/V heads; GQA and MQA included) or "mla" (over a latent cache): its heads say."""
        return self.heads.kind

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of the paged K/V cache tensors (bytes for a split latent cache)."""
        return torch.uint8 if self.kv_dtype in SPLIT_LATENT else FP8_CACHE_DTYPES.get(self.kv_dtype, self.dtype)

    @property
    def cache_bytes_per_token(self) -> int:
        split = SPLIT_LATENT.get(self.kv_dtype)
        if split:
            return split.entry_bytes(self.heads)
        return self.heads.cache_elements_per_token * self.cache_dtype.itemsize

    @property
    def is_plain(self) -> bool:
        """No variant: causal or not, and nothing else (no window, softcap, sinks, empty sequences,
        fp8 cache, other layout, large logits, far or interleaved pages), in one call."""
        return (len(self.features) == 1 and self.kv_dtype == "auto" and self.kv_layout == "nhd"
                and self.logit_std == 1.0 and not self.far_pages and self.page_order == "shuffled"
                and self.calls == ONE_CALL)

    @property
    def first_block(self) -> int:
        """The first block of the case's pool: 1 (block 0 is the null block), or for far pages the
        first block whose element offset (block x elements per block) needs more than 31 bits."""
        if not self.far_pages:
            return 1
        return math.ceil(2**31 / (self.block_size * self.heads.cache_elements_per_token // 2))

    @property
    def pool_blocks(self) -> int:
        """Blocks of the paged cache: the first block, then a pool twice the size the sequences need."""
        return self.first_block + 2 * sum(math.ceil(s / self.block_size) for s in self.batch.seq_lens)

    @property
    def features(self) -> frozenset[str]:
        """The features a backend must support to run this case (matched against Capabilities.features)."""
        f = {"causal" if self.causal else "non_causal"}
        if self.sliding_window is not None:
            f.add("sliding_window")
        if self.softcap is not None:
            f.add("softcap")
        if self.sinks:
            f.add("sinks")
        if self.batch.has_empty:
            f.add("empty_sequences")
        if self.topk is not None:
            f.add("sparse")
        return frozenset(f)

    @property
    def id(self) -> str:
        """The part of a test id after the backend name, e.g. 'mixed_small-bf16-bs16-gqa4-d128-sw32'."""
        parts = [self.scenario, self.dtype_name, f"bs{self.block_size}", self.heads.id]
        if self.kv_dtype in SPLIT_LATENT:  # kvfp8_ds_mla...: `-k ds_mla` picks them
            parts.append(f"kv{self.kv_dtype}")
        elif self.kv_dtype != "auto":
            parts.append(f"kv{self.kv_dtype.replace('_', '')}")
        if self.kv_layout != "nhd":
            parts.append(self.kv_layout)
        if self.sliding_window is not None:
            parts.append(f"sw{self.sliding_window}")
        if self.softcap is not None:
            parts.append(f"cap{self.softcap:g}")
        if self.sinks:
            parts.append("sinks")
        if self.scale != self.heads.head_dim ** -0.5:
            parts.append(f"scale{self.scale:g}")
        if self.logit_std != 1.0:
            parts.append(f"logits{self.logit_std:g}")
        if self.far_pages:
            parts.append("farpages")
        if self.page_order != "shuffled":
            parts.append(self.page_order)
        if self.topk is not None:
            parts.append(f"sparse{self.topk}")
        if self.calls != ONE_CALL:
            parts.append(self.calls)
        return "-".join(parts)

    def seed(self, base_seed: int = 0) -> int:
        """Seed of this case's random data: a function of its id and the base seed only, never of
        test order, worker or process (Python's hash() is salted per process, so not that)."""
        digest = hashlib.sha256(f"{base_seed}:{self.id}:{self.batch}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def replace(self, **changes) -> "CaseSpec":
        return dataclasses.replace(self, **changes)
