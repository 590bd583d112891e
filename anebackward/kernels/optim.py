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


# Step counts go to C as int64 and grow by one per update; this bound keeps
# every reachable count (and a file's stored one) far from overflow.
MAX_STEP = 2**62


def _hparam(fn, name, v, **bounds):
    # float() also parses strings and turns True into 1.0: neither is a number here
    if isinstance(v, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{fn}: {name} must be a real number, got {v!r}")
    return C.finite_float(fn, name, v, **bounds)


_UNSET = object()


def check_adamw_hparams(fn, *, lr=_UNSET, betas=_UNSET, eps=_UNSET, weight_decay=_UNSET,
                        beta_names=("betas[0]", "betas[1]")):
    """The one validation of AdamW's hyper-parameters, used by adamw_step,
    anebackward.AdamW (constructor, step, load_state_dict), the optimizer-state
    reader and anebackward.torch.AdamW. Checks the ones given and returns
    (lr, betas, eps, weight_decay) as floats (betas a pair; None for one not
    given). TypeError for a non-number (also None, bool, str), ValueError
    for a value out of range (lr, eps, weight_decay finite and >= 0; betas
    in [0, 1)); the message names fn and the argument."""
    lr = None if lr is _UNSET else _hparam(fn, "lr", lr, lo=0.0)
    if betas is _UNSET:
        betas = None
    else:
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise TypeError(f"{fn}: betas must be a pair of numbers (beta1, beta2), got {betas!r}")
        betas = tuple(_hparam(fn, name, b, lo=0.0, hi=1.0, hi_open=True)
                      for name, b in zip(beta_names, betas))
    eps = None if eps is _UNSET else _hparam(fn, "eps", eps, lo=0.0)
    weight_decay = (None if weight_decay is _UNSET
                    else _hparam(fn, "weight_decay", weight_decay, lo=0.0))
    return lr, betas, eps, weight_decay


def check_adamw_step(fn, step, lo=1, name="step"):
    """An AdamW step count: an int in [lo, MAX_STEP] (1 for the update
    about to be taken, 0 for a state that has not stepped yet)."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"{fn}: {name} must be an int, got {step!r}")
    if not lo <= step <= MAX_STEP:
        raise ValueError(f"{fn}: {name} must be in [{lo}, 2**62], got {step!r}")
    return int(step)


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
    step = check_adamw_step(fn, step)
    lr, (beta1, beta2), eps, weight_decay = check_adamw_hparams(
        fn, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
        beta_names=("beta1", "beta2"))
    check(cfunc(fn, "adamw", backend)(fptr(param), fptr(grad), fptr(m), fptr(v), param.size, step,
                                      lr, beta1, beta2, eps, weight_decay), fn)
    return param
