"""A stand-in for FlashInfer's MLA wrapper (`flashinfer.mla.BatchMLAPagedAttentionWrapper`, 0.7),
written from its documented contract, so the translation of the `flashinfer-mla*` adapters is
tested on CPU (the real library runs on the GPU machine only).

The contract: plan(metadata=MLAPlanMetadata.csr(qo_indptr, kv_indptr, kv_indices, kv_len_arr),
num_heads, head_dim_ckv, head_dim_kpe, page_size, causal, sm_scale, q_data_type, kv_data_type,
...): request i has queries qo_indptr[i]:qo_indptr[i + 1], and its keys are the first kv_len_arr[i]
entries of its pages kv_indices[kv_indptr[i]:kv_indptr[i + 1]]; causal is bottom-right.
run(query [T, H, ckv + kpe], kv_cache [pages, page_size, ckv + kpe], return_lse,
return_lse_base_on_e, ckv_scale, kpe_scale): out [T, H, ckv] in the query's dtype and lse [T, H]
float32 (base 2 unless return_lse_base_on_e); an fp8 cache's codes times their scale.
"""
import dataclasses
import importlib.machinery
import math
import types

import torch


@dataclasses.dataclass
class MLAPlanMetadata:
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_len_arr: torch.Tensor

    @classmethod
    def csr(cls, qo_indptr, kv_indptr, kv_indices, kv_len_arr):
        return cls(qo_indptr, kv_indptr, kv_indices, kv_len_arr)


class BatchMLAPagedAttentionWrapper:
    def __init__(self, float_workspace_buffer, backend="auto", **kwargs):
        self.plan_args = None

    def plan(self, *, metadata, num_heads, head_dim_ckv, head_dim_kpe, page_size, causal, sm_scale, q_data_type,
             kv_data_type, **kwargs):
        for name in ("qo_indptr", "kv_indptr", "kv_indices", "kv_len_arr"):
            assert getattr(metadata, name).dtype == torch.int32, name
        self.plan_args = dict(meta=metadata, heads=num_heads, ckv=head_dim_ckv, kpe=head_dim_kpe, page=page_size,
                              causal=causal, scale=sm_scale, q_dtype=q_data_type, kv_dtype=kv_data_type)

    def run(self, query, kv_cache, return_lse=False, return_lse_base_on_e=False, ckv_scale=1.0, kpe_scale=1.0,
            **kwargs):
        a, m = self.plan_args, self.plan_args["meta"]
        T, H, width = query.shape
        assert query.dtype == a["q_dtype"] and kv_cache.dtype == a["kv_dtype"] and H == a["heads"]
        assert kv_cache.shape[1:] == (a["page"], a["ckv"] + a["kpe"]) and width == a["ckv"] + a["kpe"]
        scales = torch.tensor([ckv_scale] * a["ckv"] + [kpe_scale] * a["kpe"], dtype=torch.float64)
        out = torch.empty(T, H, a["ckv"], dtype=query.dtype)
        lse = torch.empty(T, H, dtype=torch.float32)
        qo, kv_ptr = m.qo_indptr.tolist(), m.kv_indptr.tolist()
        for i, n in enumerate(m.kv_len_arr.tolist()):
            pages = m.kv_indices[kv_ptr[i]:kv_ptr[i + 1]].long()
            keys = kv_cache[pages].flatten(0, 1)[:n].double() * scales  # [n, ckv + kpe]
            q = query[qo[i]:qo[i + 1]].double()
            s = torch.einsum("qhd,nd->hqn", q, keys) * a["scale"]
            if a["causal"]:
                visible = torch.arange(n)[None, :] <= n - len(q) + torch.arange(len(q))[:, None]
                s = s.masked_fill(~visible, float("-inf"))
            out[qo[i]:qo[i + 1]] = torch.einsum("hqn,nl->qhl", torch.softmax(s, -1), keys[:, :a["ckv"]]).to(query.dtype)
            lse[qo[i]:qo[i + 1]] = torch.logsumexp(s, -1).T.float()
        if not return_lse_base_on_e:
            lse = lse / math.log(2)
        return (out, lse) if return_lse else out


MODULE = types.ModuleType("flashinfer")
MODULE.__spec__ = importlib.machinery.ModuleSpec("flashinfer", None)  # so find_spec sees it installed
MLA = types.ModuleType("flashinfer.mla")
MLA.__spec__ = importlib.machinery.ModuleSpec("flashinfer.mla", None)
MLA.BatchMLAPagedAttentionWrapper, MLA.MLAPlanMetadata = BatchMLAPagedAttentionWrapper, MLAPlanMetadata
MODULE.mla = MLA
