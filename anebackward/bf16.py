"""bf16 mixed precision: which path runs, and the one precision policy.

precision="bf16" (Llama, the linear kernels, `anebackward train
--precision bf16`) rounds every matmul operand to bfloat16 (round to nearest
even) and accumulates and returns fp32; weights, weight gradients, AdamW,
RMSNorm statistics, softmax, cross-entropy and the residual stream stay fp32.

The matmuls run through oneDNN's matmul primitive (the optional extra
`pip install 'anebackward[bf16]'`, which installs the `onednn-cpu-gomp`
wheel; its libdnnl is loaded at run time, never linked) where oneDNN reports
bf16 instructions (avx512_bf16, AMX). Elsewhere, and with
ANEBACKWARD_BF16=portable, the bf16 operands are widened to fp32 and
multiplied by the fp32 sgemm: the same rounded operands, slower. Without
oneDNN, precision="bf16" raises Bf16UnavailableError (one line saying what to
install) unless ANEBACKWARD_BF16=portable asks for the portable path.

Threads: by default fixed tiles of each product run on the package's own
pool, one oneDNN thread each, so results do not depend on the thread count.
ANEBACKWARD_BF16_THREADS=onednn (or set_mode(threads="onednn")) gives each
product to oneDNN's own OpenMP threads instead; results may then depend on
the thread count.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import numpy as np

from ._native import check, ffi, fptr, lib, u16ptr
from .errors import Bf16UnavailableError

PRECISIONS = ("fp32", "bf16")
DIST = "onednn-cpu-gomp"          # the wheel of the [bf16] extra
INSTALL_HINT = "pip install 'anebackward[bf16]'"

_lock = threading.Lock()
_loaded = False


def check_precision(fn: str, precision: Optional[str]) -> str:
    """'fp32' (also for None) or 'bf16'; anything else is a ValueError."""
    if precision is None:
        return "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"{fn}: precision must be 'fp32' or 'bf16', got {precision!r}")
    return precision


def to_bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16, as the bf16 matmuls round their operands.

    Parameters
    ----------
    a : numpy.ndarray of float32
        The values, any shape and memory layout. Other dtypes are refused
        rather than converted: float64 values would be rounded twice (to
        float32 first), which is not the same as rounding them once.

    Returns
    -------
    numpy.ndarray of uint16
        A new array of a's shape holding each value's bfloat16 bits (the
        high 16 bits of the float32 pattern after rounding to nearest even;
        NaN stays NaN, inf stays inf). ``(h.astype(np.uint32) << 16).view(np.float32)``
        widens them back to float32 exactly.

    Raises
    ------
    TypeError
        If a is not a numpy.ndarray of dtype float32.

    Examples
    --------
    >>> to_bf16(np.array([1.0, 1.00390625, 1.01171875], np.float32))
    array([16256, 16256, 16258], dtype=uint16)
    """
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        t = type(a)
        got = (f"dtype {a.dtype}" if isinstance(a, np.ndarray) else
               t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}")
        raise TypeError(f"to_bf16: a must be a numpy.ndarray of float32, got {got}; convert it "
                        f"with np.asarray(a, dtype=np.float32)")
    src = np.ascontiguousarray(a)
    h = np.empty(a.shape, np.uint16)
    check(lib.ab_f32_to_bf16(u16ptr(h), fptr(src), src.size), "to_bf16")
    return h


def library_path() -> Optional[str]:
    """$ANEBACKWARD_ONEDNN_LIBRARY if set (another oneDNN 3.x build, GNU
    OpenMP runtime), else the libdnnl of the installed onednn-cpu-gomp wheel
    (which puts it in <prefix>/lib, outside site-packages), else None: then C
    tries the soname libdnnl.so.3 on the loader's search path."""
    env = os.environ.get("ANEBACKWARD_ONEDNN_LIBRARY")
    if env:
        return env
    try:
        from importlib import metadata
        dist = metadata.distribution(DIST)
    except Exception:
        return None
    for f in dist.files or ():
        if f.name.startswith("libdnnl.so"):
            p = os.path.realpath(str(dist.locate_file(f)))
            if os.path.isfile(p):
                return p
    return None


def _env_mode():
    path = os.environ.get("ANEBACKWARD_BF16", "auto") or "auto"
    threads = os.environ.get("ANEBACKWARD_BF16_THREADS", "pool") or "pool"
    if path not in ("auto", "portable"):
        raise ValueError(f"ANEBACKWARD_BF16 must be 'auto' or 'portable', got {path!r}")
    if threads not in ("pool", "onednn"):
        raise ValueError(f"ANEBACKWARD_BF16_THREADS must be 'pool' or 'onednn', got {threads!r}")
    return path, threads


def _ensure_loaded() -> None:
    """Load oneDNN once (from the wheel's file), apply the environment's mode."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        path, threads = _env_mode()
        p = library_path()
        err = ffi.new("char[]", 512)
        lib.ab_bf16_init(p.encode() if p else ffi.NULL, err, 512)
        lib.ab_bf16_set_mode(lib.AB_BF16_PORTABLE if path == "portable" else lib.AB_BF16_AUTO,
                             lib.AB_BF16_ONEDNN_THREADS if threads == "onednn"
                             else lib.AB_BF16_POOL)
        _loaded = True


def set_mode(path: Optional[str] = None, threads: Optional[str] = None) -> None:
    """path: 'auto' (oneDNN where it has bf16 instructions, else portable) or
    'portable' (always; needs no oneDNN). threads: 'pool' (the package's pool,
    results independent of the thread count) or 'onednn' (oneDNN's own
    OpenMP threads). None keeps the current setting. Process-wide."""
    _ensure_loaded()
    if path not in (None, "auto", "portable"):
        raise ValueError(f"set_mode: path must be 'auto' or 'portable', got {path!r}")
    if threads not in (None, "pool", "onednn"):
        raise ValueError(f"set_mode: threads must be 'pool' or 'onednn', got {threads!r}")
    lib.ab_bf16_set_mode(-1 if path is None else
                         (lib.AB_BF16_PORTABLE if path == "portable" else lib.AB_BF16_AUTO),
                         -1 if threads is None else
                         (lib.AB_BF16_ONEDNN_THREADS if threads == "onednn" else lib.AB_BF16_POOL))


def get_mode() -> dict:
    _ensure_loaded()
    p, t = ffi.new("int *"), ffi.new("int *")
    lib.ab_bf16_get_mode(p, t)
    return {"path": "portable" if p[0] == lib.AB_BF16_PORTABLE else "auto",
            "threads": "onednn" if t[0] == lib.AB_BF16_ONEDNN_THREADS else "pool"}


def path() -> str:
    """'onednn', 'portable' or 'unavailable': what a bf16 matmul runs now."""
    _ensure_loaded()
    return {lib.AB_BF16_ONEDNN: "onednn", lib.AB_BF16_PORTABLE: "portable"}.get(
        lib.ab_bf16_path(), "unavailable")


def describe() -> str:
    """One line: the path, oneDNN's version, ISA and kernel, or why not."""
    _ensure_loaded()
    return ffi.string(lib.ab_bf16_describe()).decode()


def available() -> bool:
    """True when precision='bf16' can run (oneDNN loaded, or portable asked for)."""
    return path() != "unavailable"


def require(fn: str) -> None:
    """Raise Bf16UnavailableError (one line: what to install) unless bf16 can run."""
    if not available():
        raise Bf16UnavailableError(
            f"{fn}: precision='bf16' needs oneDNN ({describe()}): {INSTALL_HINT} "
            "(or ANEBACKWARD_BF16=portable for the slow portable path)")
