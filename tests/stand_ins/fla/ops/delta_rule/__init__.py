"""A CPU stand-in for `fla.ops.delta_rule.chunk_delta_rule` (flash-linear-attention), for tests only.

The real function's signature, layout ([B, T, H, K]; beta [B, T, H]; with cu_seqlens, B must be 1), dtype
asserts (one dtype for q, k, v, and not fp32) and its `@torch.compiler.disable` (a graph break under
torch.compile), computed as the per-token delta-rule recurrence in fp32:
S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = scale * S_t^T q_t, S reset at each sequence start.
"""
from __future__ import annotations

import torch

CALLS = {"chunk_delta_rule": 0}


@torch.compiler.disable
def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    assert q.dtype == k.dtype == v.dtype
    assert q.dtype != torch.float32, "ChunkDeltaRuleFunction does not support float32. Please use bfloat16."
    assert len(beta.shape) == 3, "beta must be of shape [B, T, H] if head_first=False, or [B, H, T] otherwise."
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first is deprecated")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"The batch size is expected to be 1 rather than {q.shape[0]} when using `cu_seqlens`.")
    CALLS["chunk_delta_rule"] += 1
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    starts = set(range(0, B * T, T)) if cu_seqlens is None else set(cu_seqlens[:-1].tolist())
    qf, kf, vf, bf = (t.float().reshape(B * T, H, -1) for t in (q, k, v, beta[..., None]))
    out = torch.empty(B * T, H, v.size(-1))
    s = torch.zeros(H, K, v.size(-1))
    for t in range(B * T):
        if t in starts:
            s = torch.zeros(H, K, v.size(-1))
        kt, vt = kf[t], vf[t]  # [H, K], [H, V]
        s = s + bf[t][..., None] * kt[..., None] * (vt - torch.einsum("hkv,hk->hv", s, kt))[:, None, :]
        out[t] = scale * torch.einsum("hkv,hk->hv", s, qf[t])
    return out.view(B, T, H, -1).to(q.dtype), (s if output_final_state else None)
