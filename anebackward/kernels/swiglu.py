"""SwiGLU: y = silu(h1)·h3 and its gradients (csrc/kernels/swiglu.c).

h1, h3, y, dy are [..., hidden] of one shape. dh1/dh3 may be dy (in place).
"""
from __future__ import annotations

from .. import _checks as C
from .._backend import cfunc
from .._native import check, fptr
from ..types import Backend, F32Array


def _pair(fn, h1, h3):
    C.f32(fn, "h1", h1)
    C.f32(fn, "h3", h3)
    C.same_shape(fn, "h3", h3, h1.shape, "the shape of h1")


def swiglu(h1: F32Array, h3: F32Array, *, out: F32Array | None = None,
           backend: Backend = None) -> F32Array:
    """y = h1·sigmoid(h1)·h3. Returns y."""
    fn = "swiglu"
    _pair(fn, h1, h3)
    out = C.out(fn, "out", out, h1.shape, ("h1", h1), ("h3", h3))
    check(cfunc(fn, "swiglu_forward", backend)(fptr(out), fptr(h1), fptr(h3), h1.size), fn)
    return out


def swiglu_backward(dy: F32Array, h1: F32Array, h3: F32Array, *, dh1: F32Array | None = None,
                    dh3: F32Array | None = None,
                    backend: Backend = None) -> tuple[F32Array, F32Array]:
    """Returns (dh1, dh3): dh1 = dy·h3·σ(h1)·(1 + h1·(1 − σ(h1))), dh3 = dy·silu(h1)."""
    fn = "swiglu_backward"
    _pair(fn, h1, h3)
    C.f32(fn, "dy", dy)
    C.same_shape(fn, "dy", dy, h1.shape, "the shape of h1")
    dh1 = C.out(fn, "dh1", dh1, h1.shape, ("dy", dy), ("h1", h1), ("h3", h3), may_alias=("dy",))
    dh3 = C.out(fn, "dh3", dh3, h1.shape, ("dy", dy), ("h1", h1), ("h3", h3), ("dh1", dh1),
                may_alias=("dy",))
    check(cfunc(fn, "swiglu_backward", backend)(fptr(dh1), fptr(dh3), fptr(dy), fptr(h1),
                                                  fptr(h3), h1.size), fn)
    return dh1, dh3
