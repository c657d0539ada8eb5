"""A CPU stand-in for `fla/ops/delta_rule/chunk.py` (flash-linear-attention 0.5.2 / 0.6.0), for tests only.

`chunk_delta_rule_fwd` and `chunk_delta_rule_bwd` have FLA's signatures, layout ([B, T, H, K]; beta [B, T, H]; with
cu_seqlens, B is 1) and return values ((o, A, final_state) and (dq, dk, dv, db, dh0)); they assert what FLA's kernels
need (one non-fp32 dtype, contiguous inputs, chunk_size 16/32/64, scale given). The maths is the per-token
delta-rule recurrence in fp32, S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = scale * S_t^T q_t, S reset at
each sequence start, and its exact reverse-mode pass written out (no autograd, as FLA's Triton kernels use none).
A is a placeholder of FLA's shape [B, T, H, chunk_size]: the backward here recomputes the states instead. The public
`chunk_delta_rule`, @torch.compiler.disable'd as FLA's, is the two through an autograd Function.
"""
from __future__ import annotations

import torch

CALLS = {"chunk_delta_rule": 0, "chunk_delta_rule_fwd": 0, "chunk_delta_rule_bwd": 0}


def _check(*ts: torch.Tensor) -> None:
    q = ts[0]
    assert all(t.dtype == q.dtype for t in ts[:3]), "q, k, v must share a dtype"
    assert q.dtype != torch.float32, "ChunkDeltaRuleFunction does not support float32. Please use bfloat16."
    assert all(t.is_contiguous() for t in ts), "the kernels read contiguous [B, T, H, *] tensors"


def _starts(B: int, T: int, cu_seqlens) -> set[int]:
    if cu_seqlens is None:
        return set(range(0, B * T, T))
    assert B == 1, "with cu_seqlens the batch size is 1"
    return set(cu_seqlens[:-1].tolist())


def _states(k, v, beta, starts):
    """S_{t-1} (the state before token t) for every t, fp32: [N, H, K, V]."""
    N, H, K = k.shape
    out, s = torch.empty(N, H, K, v.size(-1)), torch.zeros(H, K, v.size(-1))
    for t in range(N):
        if t in starts:
            s = torch.zeros(H, K, v.size(-1))
        out[t] = s
        s = s + beta[t][:, None, None] * k[t][:, :, None] * (v[t] - torch.einsum("hkv,hk->hv", s, k[t]))[:, None, :]
    return out


def chunk_delta_rule_fwd(q, k, v, beta, scale: float, initial_state, output_final_state: bool, cu_seqlens=None,
                         chunk_indices=None, chunk_size: int = 64):
    _check(q, k, v, beta)
    assert chunk_size in (16, 32, 64) and initial_state is None and not output_final_state
    CALLS["chunk_delta_rule_fwd"] += 1
    B, T, H, K = q.shape
    qf, kf, vf, bf = (t.float().reshape(B * T, H, -1) for t in (q, k, v, beta[..., None]))
    prev = _states(kf, vf, bf[..., 0], _starts(B, T, cu_seqlens))
    upd = bf[..., None] * kf[..., None] * (vf - torch.einsum("nhkv,nhk->nhv", prev, kf))[:, :, None, :]
    o = scale * torch.einsum("nhkv,nhk->nhv", prev + upd, qf)
    return o.view(B, T, H, -1).to(v.dtype), k.new_zeros(B, T, H, chunk_size), None


def chunk_delta_rule_bwd(q, k, v, beta, A, scale: float, initial_state, do, dht, cu_seqlens=None, chunk_indices=None,
                         chunk_size: int = 64):
    _check(q, k, v, beta, do)
    assert scale is not None and A.shape[-1] == chunk_size and initial_state is None and dht is None
    CALLS["chunk_delta_rule_bwd"] += 1
    B, T, H, K = q.shape
    qf, kf, vf, dof = (t.float().reshape(B * T, H, -1) for t in (q, k, v, do))
    bf = beta.float().reshape(B * T, H)
    starts = _starts(B, T, cu_seqlens)
    prev = _states(kf, vf, bf, starts)
    dq, dk, dv, db = (torch.zeros_like(t) for t in (qf, kf, vf, bf))
    ds = torch.zeros(H, K, vf.size(-1))
    for t in reversed(range(B * T)):
        s0, kt, bt = prev[t], kf[t], bf[t]
        r = vf[t] - torch.einsum("hkv,hk->hv", s0, kt)  # [H, V]
        st = s0 + bt[:, None, None] * kt[:, :, None] * r[:, None, :]
        ds = ds + scale * qf[t][:, :, None] * dof[t][:, None, :]  # from o_t = scale * S_t^T q_t
        dq[t] = scale * torch.einsum("hkv,hv->hk", st, dof[t])
        dsk = torch.einsum("hkv,hk->hv", ds, kt)  # dS_t^T k
        dv[t] = bt[:, None] * dsk
        db[t] = (dsk * r).sum(-1)
        dk[t] = bt[:, None] * (torch.einsum("hkv,hv->hk", ds, r) - torch.einsum("hkv,hv->hk", s0, dsk))
        ds = ds - bt[:, None, None] * kt[:, :, None] * dsk[:, None, :]  # (I - beta k k^T) dS_t
        if t in starts:
            ds = torch.zeros_like(ds)
    shape = lambda t, ref: t.view(*ref.shape).to(ref.dtype)  # noqa: E731
    return shape(dq, q), shape(dk, k), shape(dv, v), shape(db, beta), None


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, scale, cu_seqlens):
        o, a, _ = chunk_delta_rule_fwd(q, k, v, beta, scale, None, False, cu_seqlens)
        ctx.save_for_backward(q, k, v, beta, a)
        ctx.scale, ctx.cu = scale, cu_seqlens
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, beta, a = ctx.saved_tensors
        dq, dk, dv, db, _ = chunk_delta_rule_bwd(q, k, v, beta, a, ctx.scale, None, do.contiguous(), None, ctx.cu)
        return dq, dk, dv, db, None, None


@torch.compiler.disable
def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    assert len(beta.shape) == 3, "beta must be of shape [B, T, H]"
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first is deprecated")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"The batch size is expected to be 1 rather than {q.shape[0]} when using `cu_seqlens`.")
    CALLS["chunk_delta_rule"] += 1
    scale = q.size(-1) ** -0.5 if scale is None else scale
    return _Function.apply(q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), scale, cu_seqlens), None
