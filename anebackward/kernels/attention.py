"""Causal softmax attention, MHA and GQA (csrc/kernels/attention.c).

q, out, dout: [S, n_heads*head_dim] or [B, S, n_heads*head_dim];
k, v: [.., S, n_kv_heads*head_dim], n_kv_heads dividing n_heads (GQA: query
head h reads kv head h // (n_heads // n_kv_heads)). Scale 1/sqrt(head_dim).
The backward recomputes the softmax; its scratch (one 2·min(64, S)·S-float
slab per worker thread) is the `workspace` array, allocated per call unless
you pass one to reuse (attention_workspace(S)).

cu_seqlens= (int64 [n_seq+1], anebackward.batch): varlen, q/k/v are
[N, heads*head_dim] holding several documents one after another; causal
attention stays inside each segment [cu_seqlens[i], cu_seqlens[i+1]), and the
workspace is attention_workspace(longest segment).
"""
from __future__ import annotations

import numpy as np

from .. import _checks as C
from .._backend import cfunc
from .._native import check, fptr, lib
from ..batch import check_cu_seqlens, i64ptr
from ..types import Backend, F32Array, Tokens


def _workspace_floats(fn: str, S: int) -> int:
    S = C.nonneg_int(fn, "S", S)
    if S > 2**31 - 1:
        raise ValueError(f"{fn}: S must be at most 2**31 - 1 (the BLAS's int), got {S}")
    n = int(lib.ab_attention_workspace_floats(S))
    check(n if n < 0 else 0, fn)
    return n


def attention_workspace(S: int) -> F32Array:
    """A scratch array big enough for attention(_backward) at sequence length S
    (one slab of 2·min(64, S)·S floats per worker thread, up to 16)."""
    return np.empty(max(_workspace_floats("attention_workspace", S), 1), dtype=np.float32)


def _dims(fn, q, k, v, n_heads, n_kv_heads):
    C.f32(fn, "q", q, (2, 3))
    C.f32(fn, "k", k, (2, 3))
    C.f32(fn, "v", v, (2, 3))
    n_heads = C.positive_int(fn, "n_heads", n_heads)
    n_kv_heads = n_heads if n_kv_heads is None else C.positive_int(fn, "n_kv_heads", n_kv_heads)
    if n_heads % n_kv_heads:
        raise ValueError(f"{fn}: n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
    width = q.shape[-1]
    if width % n_heads or width == 0:
        raise ValueError(f"{fn}: the last axis of q ({width}) must be a positive multiple of "
                         f"n_heads = {n_heads}")
    hd = width // n_heads
    kv_shape = q.shape[:-1] + (n_kv_heads * hd,)
    C.same_shape(fn, "k", k, kv_shape, f"q's leading axes, n_kv_heads*head_dim = {n_kv_heads}*{hd}")
    C.same_shape(fn, "v", v, kv_shape, f"q's leading axes, n_kv_heads*head_dim = {n_kv_heads}*{hd}")
    B, S = (1, q.shape[0]) if q.ndim == 2 else q.shape[:2]
    return B, S, n_heads, n_kv_heads, hd


def _workspace(fn, workspace, S):
    need = _workspace_floats(fn, S)
    if workspace is None:
        return attention_workspace(S), need
    C.f32(fn, "workspace", workspace)
    if not workspace.flags.writeable or workspace.size < need:
        raise ValueError(f"{fn}: workspace must be a writeable float32 array of at least {need} "
                         f"elements for S = {S}, got size {workspace.size}; "
                         f"use attention_workspace(S)")
    return workspace, workspace.size


def _varlen(fn, q, cu_seqlens):
    """(cu int64, n_seq, longest segment) for q [N, width]."""
    if q.ndim != 2:
        raise ValueError(f"{fn}: with cu_seqlens, q, k, v must be [N, heads*head_dim] (the "
                         f"segments one after another), got q of shape {q.shape}")
    cu = check_cu_seqlens(fn, cu_seqlens, q.shape[0])
    return cu, cu.size - 1, int(np.diff(cu).max())


def attention(q: F32Array, k: F32Array, v: F32Array, *, n_heads: int, n_kv_heads: int | None = None,
              cu_seqlens: Tokens | None = None, out: F32Array | None = None,
              workspace: F32Array | None = None,
              backend: Backend = None) -> F32Array:
    """out = softmax(q kᵀ/√hd + causal mask) v per head (per segment with
    cu_seqlens). Returns out."""
    fn = "attention"
    B, S, H, KV, hd = _dims(fn, q, k, v, n_heads, n_kv_heads)
    if cu_seqlens is not None:
        cu, n_seq, S = _varlen(fn, q, cu_seqlens)
    out = C.out(fn, "out", out, q.shape, ("q", q), ("k", k), ("v", v))
    ws, n = _workspace(fn, workspace, S)
    C.out(fn, "workspace", ws, ws.shape, ("q", q), ("k", k), ("v", v), ("out", out))
    if cu_seqlens is not None:
        check(cfunc(fn, "attention_forward_varlen", backend)(
            fptr(out), fptr(q), fptr(k), fptr(v), i64ptr(cu), n_seq, H, KV, hd, fptr(ws), n), fn)
        return out
    check(cfunc(fn, "attention_forward", backend)(fptr(out), fptr(q), fptr(k), fptr(v), B, S, H,
                                                    KV, hd, fptr(ws), n), fn)
    return out


def attention_backward(dout: F32Array, q: F32Array, k: F32Array, v: F32Array, *, n_heads: int,
                       n_kv_heads: int | None = None, cu_seqlens: Tokens | None = None,
                       dq: F32Array | None = None,
                       dk: F32Array | None = None, dv: F32Array | None = None,
                       workspace: F32Array | None = None,
                       backend: Backend = None) -> tuple[F32Array, F32Array, F32Array]:
    """Gradients of attention w.r.t. q, k, v. Returns (dq, dk, dv), written
    (not accumulated); for GQA, dk/dv sum over the heads sharing a kv head."""
    fn = "attention_backward"
    B, S, H, KV, hd = _dims(fn, q, k, v, n_heads, n_kv_heads)
    if cu_seqlens is not None:
        cu, n_seq, S = _varlen(fn, q, cu_seqlens)
    C.f32(fn, "dout", dout)
    C.same_shape(fn, "dout", dout, q.shape, "the shape of q")
    ins = (("dout", dout), ("q", q), ("k", k), ("v", v))
    dq = C.out(fn, "dq", dq, q.shape, *ins)
    dk = C.out(fn, "dk", dk, k.shape, *ins, ("dq", dq))
    dv = C.out(fn, "dv", dv, v.shape, *ins, ("dq", dq), ("dk", dk))
    ws, n = _workspace(fn, workspace, S)
    C.out(fn, "workspace", ws, ws.shape, *ins, ("dq", dq), ("dk", dk), ("dv", dv))
    if cu_seqlens is not None:
        check(cfunc(fn, "attention_backward_varlen", backend)(
            fptr(dq), fptr(dk), fptr(dv), fptr(dout), fptr(q), fptr(k), fptr(v), i64ptr(cu),
            n_seq, H, KV, hd, fptr(ws), n), fn)
        return dq, dk, dv
    check(cfunc(fn, "attention_backward", backend)(fptr(dq), fptr(dk), fptr(dv), fptr(dout),
                                                     fptr(q), fptr(k), fptr(v), B, S, H, KV, hd,
                                                     fptr(ws), n), fn)
    return dq, dk, dv
