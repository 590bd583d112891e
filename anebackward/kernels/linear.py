"""linear: y = x·Wᵀ and its gradients (csrc/kernels/linear.c).

x is [..., in] (token-major rows, any leading axes), W is [out, in] like
nn.Linear.weight, y and dy are [..., out].

precision="bf16": the operands are rounded to bfloat16 (round to nearest
even) and the products accumulated and returned in fp32 (anebackward.bf16);
the default "fp32" multiplies the float32 values as they are.
"""
from __future__ import annotations

import math

from .. import _checks as C
from .._backend import cfunc, cfunc_for, resolve
from .._native import check, fptr, lib
from .. import ane
from .. import bf16 as _bf16
from ..types import Backend, F32Array


def _rows(fn, a, name, width, wname):
    if a.ndim < 1 or a.shape[-1] != width:
        raise ValueError(f"{fn}: the last axis of {name} must be {wname} = {width}, "
                         f"got {name}.shape = {a.shape}")
    return math.prod(a.shape[:-1])


def _bf16_func(fn, backend, name):
    """The bf16 C kernel for this call: fast CPU kernels only (the seed loops
    and the ANE are fp32/fp16 paths), and oneDNN or the portable path there."""
    b = resolve(fn, backend)
    if b in ("reference", "ane"):
        raise ValueError(f"{fn}: precision='bf16' runs on the CPU kernels; backend={b!r} has "
                         "no bf16 path (use backend='cpu' or 'auto')")
    _bf16.require(fn)
    return getattr(lib, "ab_" + name + "_bf16")


def linear(x: F32Array, W: F32Array, *, out: F32Array | None = None,
           backend: Backend = None, precision: str | None = None) -> F32Array:
    """y[..., out] = x[..., in] · W[out, in]ᵀ. Returns y (written into `out` if given).
    precision: "fp32" (default) or "bf16" (see the module doc)."""
    fn = "linear"
    C.f32(fn, "x", x)
    C.f32(fn, "W", W, 2)
    n_out, n_in = W.shape
    N = _rows(fn, x, "x", n_in, "W.shape[1]")
    out = C.out(fn, "out", out, x.shape[:-1] + (n_out,), ("x", x), ("W", W))
    f = (_bf16_func(fn, backend, "linear_forward") if _bf16.check_precision(fn, precision) == "bf16"
         else cfunc(fn, "linear_forward", backend))
    check(f(fptr(out), fptr(x), fptr(W), N, n_in, n_out), fn)
    return out


def linear_backward_dx(dy: F32Array, W: F32Array, *, dx: F32Array | None = None,
                       accumulate: bool = False, backend: Backend = None,
                       precision: str | None = None) -> F32Array:
    """dx[..., in] = dy[..., out] · W[out, in]; with accumulate=True, dx += that.
    precision: "fp32" (default) or "bf16" (see the module doc)."""
    fn = "linear_backward_dx"
    out = dx
    C.f32(fn, "dy", dy)
    C.f32(fn, "W", W, 2)
    n_out, n_in = W.shape
    N = _rows(fn, dy, "dy", n_out, "W.shape[0]")
    if accumulate and out is None:
        raise ValueError(f"{fn}: accumulate=True needs the array to accumulate into: pass dx=")
    out = C.out(fn, "dx", out, dy.shape[:-1] + (n_in,), ("dy", dy), ("W", W))
    if _bf16.check_precision(fn, precision) == "bf16":
        check(_bf16_func(fn, backend, "linear_backward_dx")(
            fptr(out), fptr(dy), fptr(W), N, n_in, n_out, int(bool(accumulate))), fn)
        return out
    b = resolve(fn, backend)
    if b in ("ane", "auto") and ane.routes(b, "linear_backward_dx", N=N, n_in=n_in, n_out=n_out):
        return ane.linear_backward_dx(dy, W, dx=out, accumulate=accumulate, backend=b)
    check(cfunc_for(b, "linear_backward_dx")(fptr(out), fptr(dy), fptr(W), N, n_in, n_out,
                                                     int(bool(accumulate))), fn)
    return out


def linear_backward_dW(dy: F32Array, x: F32Array, *, dW: F32Array | None = None,
                       accumulate: bool = False, backend: Backend = None,
                       precision: str | None = None) -> F32Array:
    """dW[out, in] = dy[..., out]ᵀ · x[..., in] summed over all rows (precision:
    "fp32" default or "bf16", see the module doc);
    with accumulate=True, dW += that (gradient accumulation)."""
    fn = "linear_backward_dW"
    out = dW
    C.f32(fn, "dy", dy)
    C.f32(fn, "x", x)
    if dy.ndim < 1 or x.ndim < 1 or dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{fn}: dy and x must have the same leading (row) axes, got "
                         f"dy.shape = {dy.shape} and x.shape = {x.shape}")
    n_out, n_in = dy.shape[-1], x.shape[-1]
    N = math.prod(x.shape[:-1])
    if accumulate and out is None:
        raise ValueError(f"{fn}: accumulate=True needs the array to accumulate into: pass dW=")
    out = C.out(fn, "dW", out, (n_out, n_in), ("dy", dy), ("x", x))
    f = (_bf16_func(fn, backend, "linear_backward_dW")
         if _bf16.check_precision(fn, precision) == "bf16"
         else cfunc(fn, "linear_backward_dW", backend))
    check(f(fptr(out), fptr(dy), fptr(x), N, n_in, n_out, int(bool(accumulate))), fn)
    return out
