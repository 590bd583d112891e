"""Argument checks shared by every kernel wrapper.

Policy (docs/kernels.md, "Conventions"): float arrays must already be float32 and C-contiguous
— the package never copies a float buffer behind the caller's back — and a
wrong one raises TypeError (dtype, type) or ValueError (layout, shape) that
names the function, the argument, what was expected and the fix. Token ids
are small, so integer arrays of another dtype are converted to int32.
"""

from typing import Any, Optional

import numpy as np

F32 = np.dtype(np.float32)
I32 = np.dtype(np.int32)


def f32(fn, name, a, ndim=None):
    """Check a float32 C-contiguous ndarray (ndim: an int or a tuple of ints)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray of float32, got "
                        f"{type(a).__name__}; wrap it with np.asarray({name}, dtype=np.float32)")
    if a.dtype != F32:
        raise TypeError(f"{fn}: {name} must have dtype float32, got {a.dtype}; "
                        f"convert it once with {name}.astype(np.float32)")
    if not a.flags.c_contiguous:
        raise ValueError(f"{fn}: {name} must be C-contiguous (got strides {a.strides} for shape "
                         f"{a.shape}); pass np.ascontiguousarray({name}) (this copies)")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if a.ndim not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{fn}: {name} must be {want}, got shape {a.shape}")
    return a


def same_shape(fn, name, a, shape, what=""):
    if a.shape != tuple(shape):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}{extra}, got {a.shape}")


def out(fn, name, a, shape, *inputs, may_alias=()):
    """An output array: allocate it, or check a given one (float32,
    C-contiguous, writeable, exact shape, not overlapping the inputs except
    the ones named in may_alias, which it may be identical to)."""
    if a is None:
        return np.empty(shape, dtype=F32)
    f32(fn, name, a)
    if not a.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only; pass a writeable array")
    same_shape(fn, name, a, shape)
    for other_name, other in inputs:
        if other is None or other is a and other_name in may_alias:
            continue
        if np.may_share_memory(a, other):
            raise ValueError(f"{fn}: {name} overlaps {other_name}; pass a separate output array")
    return a


def int_array(fn, name, a):
    """a as a numpy.ndarray (an ndarray as is, a list or the like through
    np.asarray); TypeError naming fn and name when it cannot be one. The
    dtype is for the caller to check."""
    if isinstance(a, np.ndarray):
        return a
    try:
        return np.asarray(a)
    except Exception:
        raise TypeError(f"{fn}: {name} must be an integer array, got "
                        f"{type(a).__name__}") from None


def tokens(fn, name, a, vocab_size, allow_ignore=False):
    """Token ids as a C-contiguous int32 array, range-checked.

    int32 C-contiguous input is used as is; other integer dtypes (int64,
    uint16, ...) are converted (tokens are small). With allow_ignore, -1
    marks an ignored position."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray of integers, got {type(a).__name__}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{fn}: {name} must have an integer dtype (int32, int64, uint16), got {a.dtype}")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        low_ok = -1 if allow_ignore else 0
        if lo < low_ok or hi >= vocab_size:
            bad = np.flatnonzero((a.ravel() < low_ok) | (a.ravel() >= vocab_size))[0]
            rng = f"[0, {vocab_size})" + (" or -1 (ignored)" if allow_ignore else "")
            raise ValueError(f"{fn}: {name} must be in {rng}; {name}.flat[{bad}] = "
                             f"{int(a.ravel()[bad])}")
    if a.dtype != I32 or not a.flags.c_contiguous:
        a = a.astype(I32, order="C")        # keeps a 0-d array 0-d, unlike ascontiguousarray
    return a


def positive_int(fn: str, name: str, v: Any) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{fn}: {name} must be a positive int, got {v!r}")
    return int(v)


def nonneg_int(fn: str, name: str, v: Any) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{fn}: {name} must be a non-negative int, got {v!r}")
    return int(v)


def finite_float(fn: str, name: str, v: Any, lo: Optional[float] = None, lo_open: bool = False,
                 hi: Optional[float] = None, hi_open: bool = False) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a real number, got {v!r}") from None
    if not np.isfinite(f):
        raise ValueError(f"{fn}: {name} must be finite, got {v!r}")
    if lo is not None and (f < lo or (lo_open and f == lo)):
        raise ValueError(f"{fn}: {name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and (f > hi or (hi_open and f == hi)):
        raise ValueError(f"{fn}: {name} must be {'<' if hi_open else '<='} {hi}, got {v!r}")
    return f
