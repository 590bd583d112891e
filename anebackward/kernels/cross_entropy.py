"""Softmax cross-entropy, loss and dlogits fused (csrc/kernels/cross_entropy.c).

logits [..., V] float32; targets [...] integer ids in [0, V), or -1 to
ignore a position (llama2.c's ignore_index). The loss is the mean over the
counted positions, as torch.nn.functional.cross_entropy(..., ignore_index=-1);
loss_denominator= replaces the count (sum / denominator: HF Trainer's
num_items_in_batch, the counted targets of every micro-batch of a step).
"""
from __future__ import annotations

import math

from .. import _checks as C
from .._backend import cfunc
from .._native import check, ffi, fptr, iptr
from ..types import Backend, F32Array, Tokens


def _common(fn, logits, targets):
    C.f32(fn, "logits", logits)
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{fn}: logits must be [..., vocab] with vocab > 0, got {logits.shape}")
    V = logits.shape[-1]
    tg = C.tokens(fn, "targets", targets, V, allow_ignore=True)
    if tg.shape != logits.shape[:-1]:
        raise ValueError(f"{fn}: targets must have shape logits.shape[:-1] = {logits.shape[:-1]}, "
                         f"got {tg.shape}")
    return tg, math.prod(logits.shape[:-1]), V


def _denominator(fn, denominator):
    if denominator is None:
        return 0.0
    return C.finite_float(fn, "loss_denominator", denominator, lo=0.0, lo_open=True)


def cross_entropy_backward(logits: F32Array, targets: Tokens, *, dlogits: F32Array | None = None,
                           grad_scale: float = 1.0, loss_denominator: float | None = None,
                           backend: Backend = None) -> tuple[float, F32Array]:
    """Returns (loss, dlogits), dlogits = (softmax − onehot)·grad_scale / n.

    dlogits may be `logits` itself to overwrite the logits buffer in place
    (no second vocab-sized buffer). If no position is counted the loss is
    NaN and dlogits is zero (like PyTorch)."""
    fn = "cross_entropy_backward"
    tg, N, V = _common(fn, logits, targets)
    grad_scale = C.finite_float(fn, "grad_scale", grad_scale)
    den = _denominator(fn, loss_denominator)
    dlogits = C.out(fn, "dlogits", dlogits, logits.shape, ("logits", logits), may_alias=("logits",))
    loss = ffi.new("double *")
    check(cfunc(fn, "cross_entropy_ex", backend)(loss, ffi.NULL, fptr(dlogits), fptr(logits),
                                                 iptr(tg), N, V, grad_scale, den), fn)
    return float(loss[0]), dlogits


def cross_entropy(logits: F32Array, targets: Tokens, *,
                  loss_denominator: float | None = None, backend: Backend = None) -> float:
    """The mean cross-entropy loss only (no gradient buffer)."""
    fn = "cross_entropy"
    tg, N, V = _common(fn, logits, targets)
    den = _denominator(fn, loss_denominator)
    loss = ffi.new("double *")
    check(cfunc(fn, "cross_entropy_ex", backend)(loss, ffi.NULL, ffi.NULL, fptr(logits),
                                                 iptr(tg), N, V, 1.0, den), fn)
    return float(loss[0])
