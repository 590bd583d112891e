"""Apple Neural Engine dispatch: the Python front of csrc/ane.

Which platform runs ANE programs in this process:
  - "darwin"   the Neural Engine itself, through Apple's private
               AppleNeuralEngine.framework (macOS on Apple Silicon only);
  - "emulated" a software interpreter of the same MIL programs with fp16
               rounding, for development and tests on any machine. Chosen
               with ANEBACKWARD_ANE=emulate or use_emulator(True).
ANEBACKWARD_ANE=off disables the ANE (available() is False).

What runs there: linear_backward_dx (dx = dy·W, half of the backward's
matmul FLOPs). Weight gradients and everything else stay on the CPU.

Routing (backend= of anebackward.linear_backward_dx):
  "ane"   always this route; AneUnavailableError (with the reason) where
          there is no platform; platform errors raise AnebackwardError.
  "auto"  the ANE when available() and the call is worth it:
          2·N·in·out >= min_flops (default 2**26 ≈ 67 MFLOP, e.g. 256 rows of
          a 768×768 layer; smaller calls cost more in packing and dispatch
          than they save) and in, out <= 16384 (a conservative tensor-size
          limit). Never fails: any ANE problem means the CPU result.
Both: a row tile whose fp16 result overflows, or whose dy is not finite, or
weights beyond fp16 range, or a spent compile budget, runs on the CPU
(status() counts these). Nothing here runs at import time.
"""
import os
import sys
import threading

import numpy as np

from .. import _checks as C
from .._native import exception_for, ffi, fptr, lib
from ..errors import AneUnavailableError

ENV = "ANEBACKWARD_ANE"
KERNELS = ("linear_backward_dx",)
MAX_DIM = 16384

_lock = threading.Lock()
_override = None            # None: follow ENV; True: emulator; False: native
_contexts = {}              # platform key -> (ctx or None, reason)
_config = {"loss_scaling": True, "min_flops": 2 ** 26, "max_programs": 100, "tile_rows": 256}
_local = threading.local()

_ERRCAP = 1024
_FALLBACKS = {lib.AB_ANE_FB_NONE: None, lib.AB_ANE_FB_OVERFLOW: "fp16 overflow",
              lib.AB_ANE_FB_RANGE: "input outside fp16 range (inf/NaN in dy or |W| >= 65520)",
              lib.AB_ANE_FB_BUDGET: "compile budget spent", lib.AB_ANE_FB_ERROR: "platform error"}


def _wanted():
    """(platform key, reason if disabled): "emulated", "native" or None."""
    if _override is not None:
        return ("emulated", None) if _override else ("native", None)
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("emulate", "emulated", "emulator"):
        return "emulated", None
    if v in ("", "native", "auto", "on", "1"):
        return "native", None
    if v in ("off", "0", "none", "disable", "disabled"):
        return None, f"disabled by {ENV}={os.environ[ENV]!r}"
    return None, (f"{ENV}={os.environ[ENV]!r} is not understood; use 'emulate' (software "
                  "emulator), 'native' (the Neural Engine on Apple Silicon) or 'off'")


def _open(key):
    """Open (once) the context of a platform; returns (ctx or None, reason)."""
    with _lock:
        if key in _contexts:
            return _contexts[key]
        if key == "native" and sys.platform != "darwin":
            res = (None, f"the Apple Neural Engine exists only on Apple Silicon Macs; this is "
                         f"{sys.platform} (set {ENV}=emulate or call anebackward.ane."
                         "use_emulator() to run the ANE programs in the software emulator)")
        else:
            p = ffi.new("ab_ane_ctx **")
            err = ffi.new("char[]", _ERRCAP)
            rc = lib.ab_ane_open(p, ffi.NULL if key == "native" else key.encode(), err, _ERRCAP)
            if rc:
                res = (None, ffi.string(err).decode(errors="replace") or
                       ffi.string(lib.ab_ane_strerror(rc)).decode())
            else:
                ctx = ffi.gc(p[0], lib.ab_ane_close)
                _apply_config(ctx)
                res = (ctx, None)
        _contexts[key] = res
        return res


def _apply_config(ctx):
    rc = lib.ab_ane_configure(ctx, int(_config["loss_scaling"]), _config["max_programs"],
                              _config["tile_rows"])
    if rc:
        raise ValueError(f"anebackward.ane.configure: rejected settings {_config}")


def _current():
    """(ctx or None, platform key or None, reason)."""
    key, reason = _wanted()
    if key is None:
        return None, None, reason
    ctx, reason = _open(key)
    return ctx, key, reason


def use_emulator(enable=True):
    """Run ANE programs in the software emulator (True), on the Neural Engine
    (False), or as ANEBACKWARD_ANE says (None). Returns the previous setting."""
    global _override
    if enable not in (True, False, None):
        raise ValueError(f"use_emulator: enable must be True, False or None, got {enable!r}")
    prev, _override = _override, enable
    return prev


def configure(*, loss_scaling=None, min_flops=None, max_programs=None, tile_rows=None):
    """Change dispatch settings (None keeps a value); returns the settings.

    loss_scaling  scale dy by a power of two before its fp16 conversion so
                  small gradients do not underflow (default True; turn off
                  only to see why it is on).
    min_flops     "auto" sends a call to the ANE when 2·N·in·out >= this.
    max_programs  compile budget of each context (the ANE allows ~119
                  compiles per process); new shapes beyond it use the CPU.
    tile_rows     rows per ANE program (spatial size), a multiple of 32."""
    fn = "anebackward.ane.configure"
    new = dict(_config)
    if loss_scaling is not None:
        if not isinstance(loss_scaling, (bool, np.bool_)):
            raise TypeError(f"{fn}: loss_scaling must be True or False, got {loss_scaling!r}")
        new["loss_scaling"] = bool(loss_scaling)
    if min_flops is not None:
        new["min_flops"] = C.nonneg_int(fn, "min_flops", min_flops)
    if max_programs is not None:
        new["max_programs"] = C.nonneg_int(fn, "max_programs", max_programs)
    if tile_rows is not None:
        t = C.positive_int(fn, "tile_rows", tile_rows)
        if t % 32 or t > 1 << 20:
            raise ValueError(f"{fn}: tile_rows must be a multiple of 32 up to 2**20, got {t}")
        new["tile_rows"] = t
    with _lock:
        _config.update(new)
        for ctx, _ in _contexts.values():
            if ctx is not None:
                _apply_config(ctx)
    return dict(_config)


def available():
    """True when ANE programs can run in this process (on the Neural Engine,
    or in the emulator when that is selected)."""
    return _current()[0] is not None


def status():
    """Where ANE programs run and why not, as a dict: available, platform
    ("darwin", "emulated" or None), reason (None when available),
    compiles, cache_size (programs cached), max_programs, calls, tiles on
    ANE/CPU, fallbacks by cause, last_error, settings, fp16 conversion path."""
    ctx, key, reason = _current()
    d = {"available": ctx is not None, "platform": None, "reason": reason,
         "os": sys.platform, "fp16_path": ffi.string(lib.ab_ane_fp16_path()).decode(),
         "compiles": 0, "cache_size": 0}
    d.update(_config)
    if ctx is None:
        return d
    st = ffi.new("ab_ane_stats *")
    lib.ab_ane_get_stats(ctx, st)
    buf = ffi.new("char[]", _ERRCAP)
    lib.ab_ane_last_error(ctx, buf, _ERRCAP)
    d.update(platform=ffi.string(lib.ab_ane_platform_name(ctx)).decode(),
             compiles=st.compiles, cache_size=st.programs, max_programs=st.max_programs,
             tile_rows=st.tile_rows, loss_scaling=bool(st.loss_scaling), calls=st.calls,
             tiles_ane=st.tiles_ane, tiles_cpu=st.tiles_cpu,
             fallbacks={"overflow": st.fallback_overflow, "range": st.fallback_range,
                        "budget": st.fallback_budget, "error": st.fallback_error},
             last_error=ffi.string(buf).decode(errors="replace") or None)
    return d


def require():
    """Raise AneUnavailableError (with the reason) unless the ANE is usable."""
    ctx, _, reason = _current()
    if ctx is None:
        raise AneUnavailableError(f"backend='ane' requested but the ANE is unavailable: {reason}; "
                                  "use backend='auto' (falls back to the CPU) or 'cpu'")


def routes(backend, kernel, **shape):
    """Whether a call of `kernel` with this resolved backend and shape runs on
    the ANE (see the module docstring for the "auto" rule)."""
    if backend not in ("ane", "auto") or kernel not in KERNELS or not available():
        return False
    if backend == "ane":
        return True
    N, n_in, n_out = shape["N"], shape["n_in"], shape["n_out"]
    return (2 * N * n_in * n_out >= _config["min_flops"] and 0 < n_in <= MAX_DIM
            and 0 < n_out <= MAX_DIM)


def last_call():
    """How this thread's latest ANE call went: tiles, tiles_cpu, fallback
    (cause of the first CPU tile, or None), scale_log2 (dy was scaled by
    2**scale_log2 on the way into fp16). None before the first call."""
    return getattr(_local, "info", None)


def linear_backward_dx(dy, W, *, out=None, accumulate=False, backend="ane"):
    """dx[..., in] = dy[..., out] · W[out, in] on the ANE (accumulate=True:
    out += that). backend="ane" raises if there is no ANE or the platform
    fails (out is then untouched, or complete when evaluation failed midway
    and the CPU finished the rows); "auto" falls back to the CPU on any ANE
    problem. See last_call() for how the call went."""
    fn = "anebackward.ane.linear_backward_dx"
    if backend not in ("ane", "auto"):
        raise ValueError(f"{fn}: backend must be 'ane' or 'auto', got {backend!r}")
    C.f32(fn, "dy", dy)
    C.f32(fn, "W", W, 2)
    n_out, n_in = W.shape
    if dy.ndim < 1 or dy.shape[-1] != n_out:
        raise ValueError(f"{fn}: the last axis of dy must be W.shape[0] = {n_out}, got dy.shape = {dy.shape}")
    N = int(np.prod(dy.shape[:-1], dtype=np.int64))
    if accumulate and out is None:
        raise ValueError(f"{fn}: accumulate=True needs the array to accumulate into: pass out=")
    out = C.out(fn, "out", out, dy.shape[:-1] + (n_in,), ("dy", dy), ("W", W))
    ctx, _, reason = _current()
    if ctx is None:
        if backend == "ane":
            require()
        rc = lib.ab_linear_backward_dx(fptr(out), fptr(dy), fptr(W), N, n_in, n_out, int(bool(accumulate)))
        _local.info = {"tiles": 0, "tiles_cpu": 0, "fallback": "unavailable", "scale_log2": 0}
    else:
        info = ffi.new("ab_ane_call_info *")
        err = ffi.new("char[]", _ERRCAP)
        flags = (lib.AB_ANE_STRICT if backend == "ane" else 0)
        rc = lib.ab_ane_linear_backward_dx(ctx, fptr(out), fptr(dy), fptr(W), N, n_in, n_out,
                                           int(bool(accumulate)), flags, info, err, _ERRCAP)
        _local.info = {"tiles": info.tiles, "tiles_cpu": info.tiles_cpu,
                       "fallback": _FALLBACKS.get(info.fallback, info.fallback),
                       "scale_log2": info.scale_log2}
        if rc:
            msg = ffi.string(err).decode(errors="replace") or ffi.string(lib.ab_ane_strerror(rc)).decode()
            raise exception_for(rc)(f"{fn}: {msg} (C error {rc})")
    if rc:
        raise exception_for(rc)(
            f"{fn}: {ffi.string(lib.ab_strerror(rc)).decode()} (C error {rc})")
    return out


def self_test():
    """Run a small dx problem whose every value is exact in fp16 on the
    current platform and compare with the CPU bit for bit. Returns None when
    it passes, else the reason (a string). Costs one compile (the program
    stays cached). The darwin platform runs this when it opens, so that a
    Mac whose Neural Engine cannot run programs (e.g. a virtual machine)
    reports available() False with that reason."""
    ctx, _, reason = _current()
    if ctx is None:
        return reason
    err = ffi.new("char[]", _ERRCAP)
    rc = lib.ab_ane_self_test(ctx, err, _ERRCAP)
    return (ffi.string(err).decode(errors="replace") or ffi.string(lib.ab_ane_strerror(rc)).decode()) if rc else None


def mil_linear_dx(S, n_in, n_out):
    """The MIL program text that computes dx for S rows (diagnosis, tests)."""
    fn = "anebackward.ane.mil_linear_dx"
    S, n_in, n_out = (C.positive_int(fn, k, v) for k, v in (("S", S), ("n_in", n_in), ("n_out", n_out)))
    n = lib.ab_ane_mil_linear_dx(ffi.NULL, 0, S, n_in, n_out)
    if n < 0:
        raise ValueError(f"{fn}: sizes too large for an ANE tensor (S={S}, n_in={n_in}, n_out={n_out})")
    buf = ffi.new("char[]", n + 1)
    lib.ab_ane_mil_linear_dx(buf, n + 1, S, n_in, n_out)
    return ffi.string(buf, n).decode()


def run_mil(mil, x, out_shape, out_dtype=np.float16):
    """Compile and run arbitrary MIL text once on the current platform with
    one input array `x` (its bytes are the input surface) and return the
    output as an array of out_shape/out_dtype. For tests and diagnosis;
    counts against the compile budget. Errors raise AnebackwardError with
    the platform's message (a malformed program: its line and reason)."""
    fn = "anebackward.ane.run_mil"
    if not isinstance(mil, str):
        raise TypeError(f"{fn}: mil must be a str, got {type(mil).__name__}")
    if not isinstance(x, np.ndarray) or not x.flags.c_contiguous:
        raise TypeError(f"{fn}: x must be a C-contiguous numpy.ndarray")
    require()
    ctx = _current()[0]
    res = np.empty(out_shape, dtype=out_dtype)
    err = ffi.new("char[]", _ERRCAP)
    rc = lib.ab_ane_run_mil(ctx, mil.encode(), ffi.from_buffer(x), x.nbytes,
                            ffi.from_buffer(res), res.nbytes, err, _ERRCAP)
    if rc:
        raise exception_for(rc)(
            f"{fn}: {ffi.string(err).decode(errors='replace')} (C error {rc})")
    return res


def reset():
    """Close every context (programs, surfaces, counters) — a fresh start,
    e.g. between tests. The process-wide compile limit of the ANE is not
    reset by this."""
    with _lock:
        _contexts.clear()
