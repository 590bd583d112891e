"""Apple Neural Engine dispatch: the Python front of csrc/ane.

Which platform runs ANE programs in this process:
  - "darwin"   the Neural Engine itself, through Apple's private
               AppleNeuralEngine.framework (macOS on Apple Silicon only);
  - "emulated" a software interpreter of the same MIL programs with fp16
               rounding, for development and tests on any machine. Chosen
               with ANEBACKWARD_ANE=emulate or use_emulator(True).
ANEBACKWARD_ANE=off disables the ANE (available() is False).

What runs there: linear (y = x·Wᵀ) and linear_backward_dx (dx = dy·W),
both with one dynamic-weight program family (x or dy packed with W, or
Wᵀ, in one fp16 input); the model fuses projections that share an input
(w1+w3, wq+wk+wv) into one evaluation. Weight gradients and everything else
stay on the CPU.

Routing (backend= of anebackward.linear_backward_dx and of Llama; the
default backend is "cpu": the ANE is opt-in until a Mac has measured it
winning, see docs/ane.md):
  "ane"   always this route; AneUnavailableError (with the reason) where
          there is no platform; platform errors raise AnebackwardError.
  "auto"  the ANE when available(), the call is worth it (2·N·in·out >=
          min_flops, default 2**26 ≈ 67 MFLOP, e.g. 256 rows of a 768×768
          layer: a starting point, not a measurement on a Mac) and the shape
          lies in the envelope the origin project ran on the hardware
          (ENVELOPE; route_reason() says why not). Never fails: any ANE
          problem means the CPU result.
Both: a row tile whose fp16 result overflows or saturates (re-run once at a
lower scale first), or whose dy is not finite, weights beyond fp16 range, or
a spent compile budget, runs on the CPU (status() counts these). Nothing
here runs at import time.

Weight staging: pass w_version (a number that changes whenever W changes,
e.g. the optimiser's step count + 1) and W is converted to fp16 once per
version instead of on every call. linear_backward() overlaps the ANE's dx
with the CPU's dW (linear_backward_dx_async() for other overlaps).
"""
import os
import sys
import threading

import numpy as np

from .. import _checks as C
from .._native import exception_for, ffi, fptr, lib
from ..errors import AnebackwardError, AneUnavailableError

ENV = "ANEBACKWARD_ANE"
KERNELS = ("linear", "linear_backward_dx")
# The shapes the origin project (github maderix/ANE, training_dynamic: the
# Stories110M and Qwen3-0.6B projections, S = 256) evaluated on the hardware:
# in and out up to 3072, packed input surfaces up to 3072 x 2560 fp16 values.
# "auto" keeps everything else on the CPU; backend="ane" may go beyond.
ENVELOPE = {"max_in": 3072, "max_out": 3072, "max_rows_per_tile": 256,
            "max_input_elements": 3072 * 2560}
ALIGN = 64                  # the core pads S, in and out to multiples of this

_lock = threading.Lock()
_override = None            # None: follow ENV; True: emulator; False: native
_contexts: dict = {}        # platform key -> (ctx or None, reason)
_config = {"loss_scaling": True, "min_flops": 2 ** 26, "max_programs": 100, "tile_rows": 256}
_local = threading.local()

_ERRCAP = 2 * lib.AB_ANE_ERRCAP
_FALLBACKS = {lib.AB_ANE_FB_NONE: None, lib.AB_ANE_FB_OVERFLOW: "fp16 overflow or saturation",
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


def context():
    """The open ANE context (a cffi ``ab_ane_ctx *`` for the C calls that
    take one, e.g. ab_model_forward_ane), or None when ANE programs cannot
    run here (status()["reason"] says why)."""
    return _current()[0]


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
    max_programs  compile budget of the process (the ANE allows ~119
                  compiles per process, whatever the contexts); new shapes
                  beyond it use the CPU. The origin project works around the
                  limit by re-executing the process (execl) and resuming from
                  a checkpoint.
    tile_rows     rows per ANE program (spatial size), a multiple of 64."""
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
        if t % ALIGN or t > 1 << 20:
            raise ValueError(f"{fn}: tile_rows must be a multiple of {ALIGN} up to 2**20, got {t}")
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
    return context() is not None


def _text(getter, ctx):
    """A whole string from one of the C getters (asks for the length first)."""
    need = ffi.new("size_t *")
    getter(ctx, ffi.NULL, 0, need)
    buf = ffi.new("char[]", need[0])
    getter(ctx, buf, need[0], ffi.NULL)
    return ffi.string(buf).decode(errors="replace")


def status():
    """Where ANE programs run and why not, as a dict: available, platform
    ("darwin", "emulated" or None), reason (None when available), self_test
    (its report: "passed: ..., relative error ..." or the failure), compiles
    (this context), process_compiles and compiles_remaining (the budget is per
    process), cache_size (programs cached), max_programs, calls, tiles on
    ANE/CPU, fallbacks by cause, overflow_reruns, load_retries,
    weight_stagings/weight_reuses, requests (program + surface bindings made:
    one per program and per staged weight, none per call), last_error,
    settings, fp16 conversion path."""
    ctx, key, reason = _current()
    d = {"available": ctx is not None, "platform": None, "reason": reason, "self_test": None,
         "os": sys.platform, "fp16_path": ffi.string(lib.ab_ane_fp16_path()).decode(),
         "compiles": 0, "process_compiles": None, "compiles_remaining": None, "cache_size": 0,
         "envelope": dict(ENVELOPE)}
    d.update(_config)
    if ctx is None:
        return d
    st = ffi.new("ab_ane_stats *")
    lib.ab_ane_get_stats(ctx, st)
    last = _text(lib.ab_ane_last_error, ctx)
    d.update(platform=ffi.string(lib.ab_ane_platform_name(ctx)).decode(),
             self_test=_text(lib.ab_ane_self_test_report, ctx),
             compiles=st.compiles, process_compiles=st.process_compiles,
             compiles_remaining=max(0, st.max_programs - st.process_compiles),
             cache_size=st.programs, max_programs=st.max_programs,
             tile_rows=st.tile_rows, loss_scaling=bool(st.loss_scaling), calls=st.calls,
             tiles_ane=st.tiles_ane, tiles_cpu=st.tiles_cpu,
             fallbacks={"overflow": st.fallback_overflow, "range": st.fallback_range,
                        "budget": st.fallback_budget, "error": st.fallback_error},
             overflow_reruns=st.overflow_reruns, load_retries=st.load_retries,
             weight_stagings=st.weight_stagings, weight_reuses=st.weight_reuses,
             requests=st.requests, last_error=last or None)
    return d


def require() -> None:
    """Raise AneUnavailableError (with the reason) unless the ANE is usable."""
    ctx, _, reason = _current()
    if ctx is None:
        raise AneUnavailableError(f"backend='ane' requested but the ANE is unavailable: {reason}; "
                                  "use backend='auto' (falls back to the CPU) or 'cpu'")


def route_reason(backend, kernel, **shape):
    """None when a call of `kernel` with this resolved backend and shape
    (N, n_in, n_out) runs on the ANE, else why it stays on the CPU."""
    if backend not in ("ane", "auto"):
        return f"backend={backend!r}"
    if kernel not in KERNELS:
        return f"{kernel} has no ANE program (only {', '.join(KERNELS)})"
    ctx, _, reason = _current()
    if ctx is None:
        return reason
    if backend == "ane":
        return None
    N, n_in, n_out = shape["N"], shape["n_in"], shape["n_out"]
    if 2 * N * n_in * n_out < _config["min_flops"]:
        return f"2·N·in·out = {2 * N * n_in * n_out} is below min_flops = {_config['min_flops']}"
    S = min(_config["tile_rows"], -(-N // ALIGN) * ALIGN)
    in_p, out_p = -(-n_in // ALIGN) * ALIGN, -(-n_out // ALIGN) * ALIGN
    # the packed input: [contracted dim, S + result dim] (linear: in, out; dx: out, in)
    C, A = (in_p, out_p) if kernel == "linear" else (out_p, in_p)
    E = ENVELOPE
    if not (0 < n_in <= E["max_in"] and 0 < n_out <= E["max_out"] and S <= E["max_rows_per_tile"]
            and C * (S + A) <= E["max_input_elements"]):
        return (f"in={n_in}, out={n_out} (input surface {C} x {S + A} after padding, "
                f"{S} rows per tile) is outside the shapes the origin project ran on the Neural "
                f"Engine (in, out <= {E['max_in']}, <= {E['max_rows_per_tile']} rows per tile, "
                f"input <= {E['max_input_elements']} values)")
    return None


def fused(width):
    """Whether projections whose fused side (the sum of their out widths) is
    `width` run as one evaluation: up to the widest side the origin ran
    (3072 after padding); wider ones run one evaluation per projection."""
    return -(-width // ALIGN) * ALIGN <= ENVELOPE["max_out"]


def routes(backend, kernel, **shape):
    """Whether a call of `kernel` with this resolved backend and shape runs on
    the ANE (see the module docstring for the "auto" rule). An "auto" call
    the rule keeps on the CPU leaves its reason in last_call()["fallback"]."""
    reason = route_reason(backend, kernel, **shape)
    if reason is not None and backend == "auto" and kernel in KERNELS:
        _local.info = _no_ane_call(f"not routed: {reason}")
    return reason is None


def last_call():
    """How this thread's latest ANE call went: tiles, tiles_cpu, fallback
    (cause of the first CPU tile, or None), scale_log2 (dy was scaled by
    2**scale_log2 on the way into fp16), w_staged (W converted to fp16 by this
    call, False when a staged copy was reused), t_start_ns/t_end_ns (when the
    call ran, clock_ns()), eval_ns (of which in the platform's evaluations:
    the rest is the CPU's staging work); linear_backward() adds
    dW_start_ns/dW_end_ns.
    None before the first call."""
    return getattr(_local, "info", None)


def clock_ns():
    """The monotonic clock (ns) of last_call()'s timestamps."""
    t = ffi.new("int64_t *")
    lib.ab_ane_clock_ns(t)
    return t[0]


def _info(info):
    return {"tiles": info.tiles, "tiles_cpu": info.tiles_cpu,
            "fallback": _FALLBACKS.get(info.fallback, info.fallback), "scale_log2": info.scale_log2,
            "w_staged": bool(info.w_staged), "t_start_ns": info.t_start_ns, "t_end_ns": info.t_end_ns,
            "eval_ns": info.eval_ns}


def _raise(fn, rc, err):
    msg = ffi.string(err).decode(errors="replace") if err is not None else ""
    msg = msg or ffi.string(lib.ab_ane_strerror(rc)).decode()
    raise exception_for(rc)(f"{fn}: {msg} (C error {rc})")


def _no_ane_call(fallback):
    """last_call() of a call that ran wholly on the CPU, and why."""
    return {"tiles": 0, "tiles_cpu": 0, "fallback": fallback, "scale_log2": 0,
            "w_staged": False, "t_start_ns": 0, "t_end_ns": 0, "eval_ns": 0}


def _matmul_args(fn, name, a, W, axis, backend, w_version):
    """The checks every ANE matmul shares: backend, a[..., k] and W float32
    with k = W.shape[axis], w_version. Returns (N, w_version), N the number
    of rows of a."""
    if backend not in ("ane", "auto"):
        raise ValueError(f"{fn}: backend must be 'ane' or 'auto', got {backend!r}")
    C.f32(fn, name, a)
    C.f32(fn, "W", W, 2)
    k = W.shape[axis]
    if a.ndim < 1 or a.shape[-1] != k:
        raise ValueError(f"{fn}: the last axis of {name} must be W.shape[{axis}] = {k}, "
                         f"got {name}.shape = {a.shape}")
    w_version = C.nonneg_int(fn, "w_version", w_version)
    if w_version >= 2 ** 64:
        raise ValueError(f"{fn}: w_version must be below 2**64, got {w_version}")
    return int(np.prod(a.shape[:-1], dtype=np.int64)), w_version


def _dx_args(fn, dy, W, out, accumulate, backend, w_version):
    """Checked arguments of a dx call: (dx, N, n_in, n_out, w_version)."""
    N, w_version = _matmul_args(fn, "dy", dy, W, 0, backend, w_version)
    n_out, n_in = W.shape
    if accumulate and out is None:
        raise ValueError(f"{fn}: accumulate=True needs the array to accumulate into: pass dx=")
    out = C.out(fn, "dx", out, dy.shape[:-1] + (n_in,), ("dy", dy), ("W", W))
    return out, N, n_in, n_out, w_version


def _run(fn, backend, ctx, cpu, ane):
    """One ANE matmul. Without a context: backend="ane" raises, "auto" runs
    cpu() (a C kernel's return code). With one: ane(flags, info, err, cap)
    (an ab_ane_* call's return code). Either way last_call() is set and a
    failure raised."""
    if ctx is None:
        if backend == "ane":
            require()
        rc = cpu()
        _local.info = _no_ane_call("unavailable")
        if rc:
            _raise(fn, rc, None)
        return
    info = ffi.new("ab_ane_call_info *")
    err = ffi.new("char[]", _ERRCAP)
    rc = ane(lib.AB_ANE_STRICT if backend == "ane" else 0, info, err, _ERRCAP)
    _local.info = _info(info)
    if rc:
        _raise(fn, rc, err)


def linear_backward_dx(dy, W, *, dx=None, accumulate=False, backend="ane", w_version=0):
    """dx[..., in] = dy[..., out] · W[out, in] on the ANE (accumulate=True:
    dx += that). backend="ane" raises if
    there is no ANE or the platform fails (dx is then untouched, or complete
    when evaluation failed midway
    and the CPU finished the rows); "auto" falls back to the CPU on any ANE
    problem. w_version: 0 converts W to fp16 on this call; else W's fp16 copy
    is reused while the version is unchanged (change it whenever W changes,
    e.g. after every optimiser step). See last_call() for how the call went."""
    fn = "anebackward.ane.linear_backward_dx"
    out, N, n_in, n_out, w_version = _dx_args(fn, dy, W, dx, accumulate, backend, w_version)
    acc = int(bool(accumulate))
    ctx, _, _ = _current()
    _run(fn, backend, ctx,
         lambda: lib.ab_linear_backward_dx(fptr(out), fptr(dy), fptr(W), N, n_in, n_out, acc),
         lambda flags, info, err, cap: lib.ab_ane_linear_backward_dx(
             ctx, fptr(out), fptr(dy), fptr(W), w_version, N, n_in, n_out, acc, flags, info,
             err, cap))
    return out


def linear(x, W, *, out=None, backend="ane", w_version=0):
    """y[..., out] = x[..., in] · Wᵀ on the ANE (the dx program with Wᵀ
    staged; fp16 operands, fp32 result). backend and w_version as for
    linear_backward_dx; see last_call()."""
    fn = "anebackward.ane.linear"
    N, w_version = _matmul_args(fn, "x", x, W, 1, backend, w_version)
    n_out, n_in = W.shape
    y = C.out(fn, "out", out, x.shape[:-1] + (n_out,), ("x", x), ("W", W))
    ctx, _, _ = _current()
    _run(fn, backend, ctx,
         lambda: lib.ab_linear_forward(fptr(y), fptr(x), fptr(W), N, n_in, n_out),
         lambda flags, info, err, cap: lib.ab_ane_linear_forward(
             ctx, fptr(y), fptr(x), fptr(W), w_version, N, n_in, n_out, flags, info, err, cap))
    return y


class AneJob:
    """A dx call running on the context's worker thread
    (linear_backward_dx_async). wait() returns dx; every job must be waited
    for, and its arrays left untouched until then (the job holds references,
    so they stay alive)."""

    def __init__(self, fn, ctx, job, arrays, out):
        self._fn, self._ctx, self._job, self._arrays, self._out = fn, ctx, job, arrays, out
        self.info = None

    def done(self):
        return self._job is None

    def wait(self):
        if self._job is None:
            return self._out
        info = ffi.new("ab_ane_call_info *")
        err = ffi.new("char[]", _ERRCAP)
        job, self._job = self._job, None
        rc = lib.ab_ane_job_wait(job, info, err, _ERRCAP)
        self.info = _info(info)
        _local.info = dict(self.info)
        self._arrays = None
        if rc:
            _raise(self._fn, rc, err)
        return self._out

    def __del__(self):              # an abandoned job is still waited for: it writes into out
        if getattr(self, "_job", None) is not None:
            lib.ab_ane_job_wait(self._job, ffi.NULL, ffi.NULL, 0)


def linear_backward_dx_async(dy, W, *, dx=None, accumulate=False, backend="ane", w_version=0):
    """linear_backward_dx queued to the ANE context's worker thread; returns
    an AneJob at once (its wait() gives dx), so the caller's thread can do CPU
    work meanwhile. Without an ANE: backend="ane" raises, "auto" computes dx
    on the CPU now and returns a finished job."""
    fn = "anebackward.ane.linear_backward_dx_async"
    out = dx
    out, N, n_in, n_out, w_version = _dx_args(fn, dy, W, out, accumulate, backend, w_version)
    ctx, _, _ = _current()
    if ctx is None:
        linear_backward_dx(dy, W, dx=out, accumulate=accumulate, backend=backend)
        j = AneJob(fn, None, None, None, out)
        j.info = dict(_local.info)
        return j
    p = ffi.new("ab_ane_job **")
    flags = (lib.AB_ANE_STRICT if backend == "ane" else 0)
    rc = lib.ab_ane_linear_backward_dx_submit(ctx, p, fptr(out), fptr(dy), fptr(W), w_version, N, n_in,
                                              n_out, int(bool(accumulate)), flags)
    if rc:
        _raise(fn, rc, None)
    return AneJob(fn, ctx, p[0], (dy, W, out), out)


def linear_backward(dy, x, W, *, dx=None, dW=None, accumulate_dx=False, accumulate_dW=False,
                    backend="ane", w_version=0):
    """Both gradients of y = x·Wᵀ with the ANE and the CPU working at once:
    dx (+)= dy·W is queued to the ANE, dW (+)= dyᵀ·x runs on the CPU (BLAS)
    meanwhile, then the dx job is waited for (the origin project's overlap).
    Returns (dx, dW); last_call() holds the dx timings plus dW_start_ns and
    dW_end_ns, on the same clock."""
    fn = "anebackward.ane.linear_backward"
    C.f32(fn, "dy", dy)
    C.f32(fn, "x", x)
    C.f32(fn, "W", W, 2)
    if x.ndim < 1 or x.shape[:-1] != dy.shape[:-1] or x.shape[-1] != W.shape[1]:
        raise ValueError(f"{fn}: x must be [..., in] with dy's leading axes and in = W.shape[1], got "
                         f"x.shape = {x.shape}, dy.shape = {dy.shape}, W.shape = {W.shape}")
    n_out, n_in = W.shape
    # the CPU kernel called directly: anebackward.kernels imports this module (no cycle)
    if accumulate_dW and dW is None:
        raise ValueError(f"{fn}: accumulate_dW=True needs the array to accumulate into: pass dW=")
    dW = C.out(fn, "dW", dW, (n_out, n_in), ("dy", dy), ("x", x), ("W", W))
    job = linear_backward_dx_async(dy, W, dx=dx, accumulate=accumulate_dx, backend=backend,
                                   w_version=w_version)
    try:
        t0 = clock_ns()
        rc = lib.ab_linear_backward_dW(fptr(dW), fptr(dy), fptr(x), x.size // max(n_in, 1), n_in,
                                       n_out, int(bool(accumulate_dW)))
        t1 = clock_ns()
        if rc:
            _raise(fn, rc, None)
    finally:
        dx = job.wait()
    info = dict(job.info)
    info.update(dW_start_ns=t0, dW_end_ns=t1)
    _local.info = info
    return dx, dW


def clear_cache():
    """Drop the current context's programs and staged weights: a shape whose
    compile or load failed is tried again at its next call (compiles already
    spent stay spent: the limit is per process)."""
    ctx = _current()[0]
    if ctx is not None:
        lib.ab_ane_clear_cache(ctx)


def self_test():
    """Run a 256×768×768 dx problem (S×in×out: Stories110M's attention
    projections at 256 rows, a shape the origin project ran on the hardware)
    on the current platform and compare with the CPU within fp16 tolerance.
    Returns None when it passes, else the reason (a string);
    status()["self_test"] keeps the report. Costs one compile unless that
    shape is cached. The darwin platform runs it whenever a context opens,
    so that a Mac whose Neural Engine cannot run programs (e.g. a virtual
    machine) reports available() False with that reason."""
    ctx, _, reason = _current()
    if ctx is None:
        return reason
    err = ffi.new("char[]", _ERRCAP)
    rc = lib.ab_ane_self_test(ctx, err, _ERRCAP)
    return (ffi.string(err).decode(errors="replace") or ffi.string(lib.ab_ane_strerror(rc)).decode()) if rc else None


def mil_linear_dx(S, n_in, n_out):
    """The MIL program text that computes dx for S rows (diagnosis, tests).
    The core adds a per-context tag to its build info when it compiles."""
    fn = "anebackward.ane.mil_linear_dx"
    S, n_in, n_out = (C.positive_int(fn, k, v) for k, v in (("S", S), ("n_in", n_in), ("n_out", n_out)))
    n = ffi.new("int64_t *")
    if lib.ab_ane_mil_linear_dx(ffi.NULL, 0, S, n_in, n_out, n):
        raise ValueError(f"{fn}: sizes too large for an ANE tensor (S={S}, n_in={n_in}, n_out={n_out})")
    buf = ffi.new("char[]", n[0] + 1)
    lib.ab_ane_mil_linear_dx(buf, n[0] + 1, S, n_in, n_out, n)
    return ffi.string(buf, n[0]).decode()


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
    e.g. between tests. Compiles already spent stay spent (the ANE's limit
    is per process: status()["process_compiles"])."""
    with _lock:
        _contexts.clear()
