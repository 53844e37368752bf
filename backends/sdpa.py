"""torch.nn.functional.scaled_dot_product_attention over K/V gathered from the paged cache.

SDPA takes no pages, so the adapter reads each sequence's K/V back through its block table and
calls SDPA once per sequence (one call for a ragged batch would need a padded [B, max_q, max_kv]
mask, which flash cannot take). Causal cases use torch's bottom-right CausalBias; a sliding window
needs an explicit boolean mask. On CUDA each SDPA kernel is also registered under its own name.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right

from conformance import Backend, Capabilities, Case, Unsupported, gather_kv, register_backend
from conformance.registry import ALL_KV_LAYOUTS

NO_SOFTCAP = frozenset({"causal", "non_causal", "sliding_window", "empty_sequences"})


def _check_cudnn_takes(q, k, v, mask) -> None:
    """cuDNN's dispatcher refuses some shapes that no static rule here describes; ask it (with the
    mask it will actually get: CausalBias materializes for cuDNN) and skip with its own words."""
    dense = mask._materialize(q.device) if isinstance(mask, CausalBias) else mask
    params = torch.backends.cuda.SDPAParams(q, k, v, dense, 0.0, False, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.backends.cuda.can_use_cudnn_attention(params, debug=True)
    if not ok:
        why = "; ".join(str(w.message) for w in caught) or "torch.backends.cuda.can_use_cudnn_attention is False"
        raise Unsupported(f"cuDNN takes no q_len={q.shape[2]}, kv_len={k.shape[2]} call: {why}")


class SdpaBackend(Backend):
    def __init__(self, name: str, kernel: SDPBackend | None, devices=("cpu", "cuda"), dtypes=None):
        self.name, self.kernel = name, kernel
        kernel_name = kernel.name.lower() if kernel else "default dispatch"
        self.description = f"torch SDPA ({kernel_name}) per sequence over K/V gathered through the block table"
        # cache_copies: the gather is of the sequences' tokens, which the harness's estimate holds already
        caps = dict(devices=frozenset(devices), features=NO_SOFTCAP, kv_layouts=ALL_KV_LAYOUTS, cache_copies=0)
        if kernel != SDPBackend.CUDNN_ATTENTION:  # cuDNN gave other bits on the same call twice (H200)
            # One SDPA call per sequence, on that sequence's tensors alone: its neighbours cannot change it.
            caps["bit_exact"] = frozenset({"batch", "run_to_run"})
        if dtypes:
            caps["dtypes"] = frozenset(dtypes)
        self.capabilities = Capabilities(**caps)

    def unsupported(self, spec, device):
        if self.kernel == SDPBackend.FLASH_ATTENTION:
            if spec.dtype == torch.float32:
                return "the flash kernel has no fp32"
            if spec.sliding_window is not None:
                return "the flash kernel takes no attention mask (sliding window needs one)"
            if spec.heads.head_dim > 256:
                return f"head_dim {spec.heads.head_dim} > 256 (flash limit)"
        return None

    def run(self, case: Case):
        k_all, v_all, kv_start = gather_kv(case)
        group = case.spec.heads.group_size
        q_start = case.query_start_loc.tolist()
        kv_start = kv_start.tolist()
        spec = case.spec
        for i in range(len(q_start) - 1):
            if q_start[i] == q_start[i + 1]:
                continue  # an empty sequence: no rows to write (and SDPA's fused kernels take no empty call)
            q = case.q[q_start[i]:q_start[i + 1]].transpose(0, 1)[None]  # [1, Hq, q_len, D]
            k = k_all[kv_start[i]:kv_start[i + 1]].transpose(0, 1)[None].repeat_interleave(group, dim=1)
            v = v_all[kv_start[i]:kv_start[i + 1]].transpose(0, 1)[None].repeat_interleave(group, dim=1)
            q_len, kv_len = q.shape[2], k.shape[2]
            mask = None
            if spec.sliding_window is not None:
                # Only the keys some query sees: a manager may have given the blocks before them back.
                first = max(0, kv_len - q_len - spec.sliding_window + 1)
                k, v = k[:, :, first:], v[:, :, first:]
                qpos = torch.arange(kv_len - q_len, kv_len, device=case.device)[:, None]
                kpos = torch.arange(first, kv_len, device=case.device)[None, :]
                mask = (kpos <= qpos) & (qpos - kpos < spec.sliding_window)
            elif spec.causal:
                mask = causal_lower_right(q_len, kv_len)
            if self.kernel == SDPBackend.CUDNN_ATTENTION:
                _check_cudnn_takes(q, k, v, mask)
            with sdpa_kernel(self.kernel) if self.kernel else contextlib.nullcontext():
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=case.scale)
            case.out[q_start[i]:q_start[i + 1]] = o[0].transpose(0, 1)
        return case.out


register_backend(SdpaBackend("sdpa", None))
# One name per CUDA kernel, so a regression in one is not hidden by the dispatcher picking another.
register_backend(SdpaBackend("sdpa-math", SDPBackend.MATH, devices=("cuda",)))
register_backend(SdpaBackend("sdpa-flash", SDPBackend.FLASH_ATTENTION, devices=("cuda",)))
register_backend(SdpaBackend("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, devices=("cuda",)))
register_backend(SdpaBackend("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, devices=("cuda",),
                             dtypes=(torch.float16, torch.bfloat16)))
