"""Gradient clipping by global L2 norm and the fused AdamW update
(csrc/kernels/optim.c). Both are single passes over flat float32 memory.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _checks as C
from .._backend import cfunc
from .._native import check, ffi, fptr
from ..types import Backend, F32Array, Grads


def _grad_list(fn, grads):
    if isinstance(grads, np.ndarray):
        grads = [grads]
    try:
        grads = list(grads)
    except TypeError:
        raise TypeError(f"{fn}: grads must be a float32 array or a sequence of them, got "
                        f"{type(grads).__name__}") from None
    for i, g in enumerate(grads):
        C.f32(fn, f"grads[{i}]", g)
    return grads


def grad_norm(grads: Grads, *, backend: Backend = None) -> float:
    """The global L2 norm over one array or a sequence of arrays (double accumulation)."""
    fn = "grad_norm"
    grads = _grad_list(fn, grads)
    acc = ffi.new("double *", 0.0)
    sumsq = cfunc(fn, "sumsq", backend)
    for g in grads:
        check(sumsq(acc, fptr(g), g.size), fn)
    return math.sqrt(acc[0])


def clip_grad_norm(grads: Grads, max_norm: float, *, backend: Backend = None) -> float:
    """Scale grads in place so that their global L2 norm is at most max_norm.

    Returns the norm before clipping. As the seed does, grads are scaled by
    max_norm / norm only when norm > max_norm. A non-finite norm (inf/NaN
    gradients) is returned and the gradients are left untouched, so the
    caller can skip the step."""
    fn = "clip_grad_norm"
    grads = _grad_list(fn, grads)
    max_norm = C.finite_float(fn, "max_norm", max_norm, lo=0.0, lo_open=True)
    for i, g in enumerate(grads):
        if not g.flags.writeable:
            raise ValueError(f"{fn}: grads[{i}] is read-only; gradients are scaled in place")
    norm = grad_norm(grads, backend=backend)
    if math.isfinite(norm) and norm > max_norm:
        scale = cfunc(fn, "scale", backend)
        s = max_norm / norm
        for g in grads:
            check(scale(fptr(g), g.size, s), fn)
    return norm


def adamw_step(param: F32Array, grad: F32Array, m: F32Array, v: F32Array, *, step: int, lr: float,
               beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0, backend: Backend = None) -> F32Array:
    """One AdamW update of param, m and v in place (decoupled weight decay,
    as torch.optim.AdamW; weight_decay=0 is Adam). `step` counts from 1.
    Returns param."""
    fn = "adamw_step"
    C.f32(fn, "param", param)
    for name, a in (("grad", grad), ("m", m), ("v", v)):
        C.f32(fn, name, a)
        C.same_shape(fn, name, a, param.shape, "the shape of param")
    for name, a in (("param", param), ("m", m), ("v", v)):
        if not a.flags.writeable:
            raise ValueError(f"{fn}: {name} is read-only; it is updated in place")
    arrays = (("param", param), ("grad", grad), ("m", m), ("v", v))
    for i, (na, a) in enumerate(arrays):
        for nb, b in arrays[i + 1:]:
            if np.may_share_memory(a, b):
                raise ValueError(f"{fn}: {na} and {nb} overlap; they must be separate arrays")
    step = C.positive_int(fn, "step", step)
    lr = C.finite_float(fn, "lr", lr, lo=0.0)
    beta1 = C.finite_float(fn, "beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
    beta2 = C.finite_float(fn, "beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
    eps = C.finite_float(fn, "eps", eps, lo=0.0)
    weight_decay = C.finite_float(fn, "weight_decay", weight_decay, lo=0.0)
    check(cfunc(fn, "adamw", backend)(fptr(param), fptr(grad), fptr(m), fptr(v), param.size, step,
                                      lr, beta1, beta2, eps, weight_decay), fn)
    return param
