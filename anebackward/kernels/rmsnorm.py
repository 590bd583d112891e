"""RMSNorm forward and backward (csrc/kernels/rmsnorm.c).

x, y, dy, dx: [..., D] token-major rows; w, dw: [D].
  y  = x / rms(x) * w,   rms(x) = sqrt(mean(x²) + eps)
  dx = w·dy/rms − x·Σ(w·dy·x)/(D·rms³)      dw += Σ_rows dy·x/rms
"""
from __future__ import annotations

import math

import numpy as np

from .. import _checks as C
from .._backend import cfunc
from .._native import check, fptr
from ..types import Backend, F32Array


def _common(fn, x, w, eps):
    C.f32(fn, "x", x)
    C.f32(fn, "w", w, 1)
    D = w.shape[0]
    if D == 0 or x.ndim < 1 or x.shape[-1] != D:
        raise ValueError(f"{fn}: the last axis of x must equal w.shape[0] = {D} (> 0), got "
                         f"x.shape = {x.shape}")
    eps = C.finite_float(fn, "eps", eps, lo=0.0)
    return math.prod(x.shape[:-1]), D, eps


def rmsnorm(x: F32Array, w: F32Array, *, eps: float = 1e-5, out: F32Array | None = None,
            backend: Backend = None) -> F32Array:
    """y = x / sqrt(mean(x², axis=-1) + eps) * w. Returns y."""
    fn = "rmsnorm"
    N, D, eps = _common(fn, x, w, eps)
    out = C.out(fn, "out", out, x.shape, ("x", x), ("w", w))
    check(cfunc(fn, "rmsnorm_forward", backend)(fptr(out), fptr(x), fptr(w), N, D, eps), fn)
    return out


def rmsnorm_backward(dy: F32Array, x: F32Array, w: F32Array, *, eps: float = 1e-5,
                     dx: F32Array | None = None, dw: F32Array | None = None,
                     accumulate: bool = False,
                     backend: Backend = None) -> tuple[F32Array, F32Array]:
    """Gradients of rmsnorm. Returns (dx, dw).

    The dx and dw you pass are overwritten, or added to with accumulate=True
    (dx: the residual stream's gradient; dw: your gradient buffer); one you
    do not pass comes back as a new array."""
    fn = "rmsnorm_backward"
    N, D, eps = _common(fn, x, w, eps)
    C.f32(fn, "dy", dy)
    C.same_shape(fn, "dy", dy, x.shape, "the shape of x")
    if accumulate and dx is None and dw is None:
        raise ValueError(f"{fn}: accumulate=True needs the arrays to accumulate into: pass "
                         "dx= and/or dw=")
    acc_dx, acc_dw = bool(accumulate) and dx is not None, bool(accumulate) and dw is not None
    dx = C.out(fn, "dx", dx, x.shape, ("dy", dy), ("x", x), ("w", w))
    if dw is None:
        dw = np.zeros(D, dtype=np.float32)
    else:
        dw = C.out(fn, "dw", dw, (D,), ("dy", dy), ("x", x), ("w", w), ("dx", dx))
        if not acc_dw:
            dw[...] = 0.0   # the C kernel adds into dw (D floats)
    check(cfunc(fn, "rmsnorm_backward", backend)(fptr(dx), fptr(dw), fptr(dy), fptr(x), fptr(w),
                                                   N, D, eps, int(acc_dx)), fn)
    return dx, dw
