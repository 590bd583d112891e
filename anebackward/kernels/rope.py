"""Rotary position embedding, llama2.c convention (csrc/kernels/rope.c).

x is [S, H*head_dim] or [B, S, H*head_dim]; pairs (2i, 2i+1) of each head
rotate by (pos_offset + s)·10000^(−2i/head_dim). The backward is the inverse
rotation. out may be x itself (in place).
"""
from __future__ import annotations

from .. import _checks as C
from .._backend import cfunc
from .._native import check, fptr
from ..types import Backend, F32Array


def _dims(fn, name, x, head_dim, pos_offset):
    C.f32(fn, name, x, (2, 3))
    head_dim = C.positive_int(fn, "head_dim", head_dim)
    pos_offset = C.nonneg_int(fn, "pos_offset", pos_offset)
    if head_dim % 2:
        raise ValueError(f"{fn}: head_dim must be even (pairs rotate), got {head_dim}")
    width = x.shape[-1]
    if width % head_dim or width == 0:
        raise ValueError(f"{fn}: the last axis of {name} ({width}) must be a positive multiple of "
                         f"head_dim = {head_dim}")
    B, S = (1, x.shape[0]) if x.ndim == 2 else x.shape[:2]
    if pos_offset > 2**63 - 1 - S:
        raise ValueError(f"{fn}: pos_offset + sequence length must stay below 2**63, got "
                         f"pos_offset={pos_offset} with {S} positions")
    return B, S, width // head_dim, head_dim, pos_offset


def _run(fn, cname, name, x, head_dim, pos_offset, out, backend, out_name="out"):
    B, S, H, hd, pos_offset = _dims(fn, name, x, head_dim, pos_offset)
    out = C.out(fn, out_name, out, x.shape, (name, x), may_alias=(name,))
    check(cfunc(fn, cname, backend)(fptr(out), fptr(x), B, S, H, hd, pos_offset), fn)
    return out


def rope(x: F32Array, *, head_dim: int, pos_offset: int = 0, out: F32Array | None = None,
         backend: Backend = None) -> F32Array:
    """Rotate q or k by their positions. Returns the rotated array."""
    return _run("rope", "rope_forward", "x", x, head_dim, pos_offset, out, backend)


def rope_backward(dy: F32Array, *, head_dim: int, pos_offset: int = 0, dx: F32Array | None = None,
                  backend: Backend = None, out: F32Array | None = None) -> F32Array:
    """Gradient of rope: rotate dy back by the same angles. Returns dx (dx=
    may be dy itself; out= is its deprecated old name)."""
    dx = C.renamed("rope_backward", "dx", dx, "out", out)
    return _run("rope_backward", "rope_backward", "dy", dy, head_dim, pos_offset, dx, backend, "dx")
