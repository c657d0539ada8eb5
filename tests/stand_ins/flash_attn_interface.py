"""A CPU stand-in for FlashAttention 3's `flash_attn_interface` (hopper/flash_attn_interface.py), for tests only.

The public functions have FA3's signatures and argument checks (bf16/fp16 only, one dtype, contiguous last dim,
head dim a multiple of 8 up to 256, GQA head ratio, int32 cu_seqlens of length batch + 1, an integer
max_seqlen no shorter than any segment), and the kernel is registered as a torch custom op with a fake
implementation and an autograd formula, as the Hopper build registers `flash_attn_3::_flash_attn_forward`: so
torch.compile(fullgraph=True) traces it as one opaque node, as it does the real one. The maths is plain torch
attention in fp32 within each (causal) segment.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

CALLS = {"dense": 0, "varlen": 0}  # how often each entry point ran (tests assert the branch was taken)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError("query and key/value must have the same dtype")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise RuntimeError("Input tensor must have contiguous last dimension")
    d = q.size(-1)
    if d % 8 or d > 256:
        raise RuntimeError("head dimension must be a multiple of 8 and at most 256")
    if q.size(-2) % k.size(-2):
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")


def _scores(q: Tensor, k: Tensor, seg: Tensor, scale: float) -> Tensor:
    """[H, N, N] causal scores within segments (fp32, -inf outside), K heads expanded for GQA."""
    kf = k.float().repeat_interleave(q.size(1) // k.size(1), 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    n = q.size(0)
    ok = (seg[:, None] == seg[None, :]) & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return s.masked_fill(~ok, float("-inf"))


def _segments(q: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    if cu_seqlens.dtype != torch.int32 or not cu_seqlens.is_contiguous():
        raise RuntimeError("cu_seqlens_q must have dtype torch.int32")
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.size(0) or bool((lens < 0).any()):
        raise RuntimeError("cu_seqlens must start at 0, never decrease and end at the total length")
    if int(lens.max()) > max_seqlen:
        raise RuntimeError(f"a segment of {int(lens.max())} tokens is longer than max_seqlen={max_seqlen}")
    return torch.repeat_interleave(torch.arange(lens.numel(), device=q.device), lens.long())


@torch.library.custom_op("flash_attn_3_stand_in::fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float, kind: str
         ) -> tuple[Tensor, Tensor]:
    """Varlen causal attention on [total, H, D] (a dense batch comes flattened with cu = row starts): out, lse.
    Calls are counted here, in the kernel (a counter in the traced wrapper would be a guard of its own)."""
    CALLS[kind] += 1
    with torch.autocast(q.device.type, enabled=False):  # a kernel of its own: fp32 maths whatever the caller's autocast
        s = _scores(q, k, _segments(q, cu_seqlens, max_seqlen), scale)
        lse = torch.logsumexp(s, dim=-1)
        vf = v.float().repeat_interleave(q.size(1) // v.size(1), 1)
        return torch.einsum("hqk,khd->qhd", torch.exp(s - lse[..., None]), vf).to(q.dtype).contiguous(), lse


@_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float, kind: str
      ) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.size(1), q.size(0), dtype=torch.float32)


@torch.library.custom_op("flash_attn_3_stand_in::bwd", mutates_args=())
def _bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int,
         scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The softmax-attention backward from the saved LSE (as FA3's backward kernel): dq, dk, dv."""
    with torch.autocast(q.device.type, enabled=False):
        rep = q.size(1) // k.size(1)
        p = torch.exp(_scores(q, k, _segments(q, cu_seqlens, max_seqlen), scale) - lse[..., None])  # [H, N, N]
        do, vf = dout.float(), v.float().repeat_interleave(rep, 1)
        dv = torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, vf)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
        dq = torch.einsum("hqk,khd->qhd", ds, k.float().repeat_interleave(rep, 1))
        dk = torch.einsum("hqk,qhd->khd", ds, q.float())
        fold = lambda t: t.view(t.size(0), k.size(1), rep, t.size(2)).sum(2)  # noqa: E731 - GQA: sum each head group
        return dq.to(q.dtype).contiguous(), fold(dk).to(k.dtype).contiguous(), fold(dv).to(v.dtype).contiguous()


@_bwd.register_fake
def _(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int,
      scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, cu, max_seqlen, scale, _ = inputs
    ctx.save_for_backward(q, k, v, output[1], cu)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward(ctx, dout, dlse):
    q, k, v, lse, cu = ctx.saved_tensors
    return (*torch.ops.flash_attn_3_stand_in.bwd(dout, q, k, v, lse, cu, ctx.max_seqlen, ctx.scale), None, None, None, None)


torch.library.register_autograd("flash_attn_3_stand_in::fwd", _backward, setup_context=_setup)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                    v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                    pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
    """[B, T, H, D] in, [B, T, H, D] out (plus the LSE [B, H, T] with return_attn_probs)."""
    if not causal or window_size != (-1, -1) or softcap:
        raise NotImplementedError("the stand-in covers causal attention without windows or softcap")
    _check(q, k, v)
    B, T = q.shape[:2]
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device)
    out, lse = torch.ops.flash_attn_3_stand_in.fwd(q.reshape(B * T, *q.shape[2:]), k.reshape(B * T, *k.shape[2:]),
                                                   v.reshape(B * T, *v.shape[2:]), cu, T,
                                                   softmax_scale or 1 / math.sqrt(q.size(-1)), "dense")
    out = out.view(q.shape)
    return (out, lse.view(q.size(2), B, T).transpose(0, 1)) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                           seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                           v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                           pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
    """[total, H, D] in and out, segments given by cu_seqlens (int32, batch + 1 entries)."""
    if not causal or window_size != (-1, -1) or softcap:
        raise NotImplementedError("the stand-in covers causal attention without windows or softcap")
    if cu_seqlens_q is not cu_seqlens_k and not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("the stand-in covers self-attention (cu_seqlens_q == cu_seqlens_k)")
    if not isinstance(max_seqlen_q, int) or max_seqlen_q != max_seqlen_k:
        raise TypeError("max_seqlen_q/max_seqlen_k must be equal Python ints")
    _check(q, k, v)
    out, lse = torch.ops.flash_attn_3_stand_in.fwd(q, k, v, cu_seqlens_q, max_seqlen_q,
                                                   softmax_scale or 1 / math.sqrt(q.size(-1)), "varlen")
    return (out, lse) if return_attn_probs else out
