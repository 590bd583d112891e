"""`anebackward bench --scaling`: every kernel and the full training step at
1..N threads of the package's one thread setting (anebackward.set_num_threads).

Per row: the median time at each thread count, the speed-up over 1 thread,
the serial fraction s fitted to those speed-ups (Amdahl: T(n) = T(1)·(s +
(1-s)/n); least squares on 1/speed-up), the speed-up s projects at 16
cores, and "fraction of sgemm rate": the row's GFLOP/s over the GFLOP/s of a
large sgemm (1024^3) measured in the same run at the same thread count, the
faster of the package's tiled sgemm and OpenBLAS on its own threads (rows
with a known flop count: the matmuls, attention and the full step).

Method: for each row the thread counts are interleaved round by round (the
order rotating), so a load change on a shared machine hits every count
alike; a sample is the mean of back-to-back calls lasting >= min_sample.
--with-load starts one CPU-bound process before measuring and stops it at
the end (the "busy machine" case: the default count must not lose to 1).

Kernel rows time the C entry points the Python call makes (recorded once
through the API, then replayed through cffi directly, ~0.3 us a call): what
the model's step and a C trainer pay, and the only part threads can change.
The Python API's own checks add a fixed cost per call (about 10-20 us),
printed once as "python overhead"; the full step goes through the API.

"cpu%n": the process's CPU time over n x the wall time at n threads (the
caller and the workers, spinning included): near 100 % with a speed-up below
n means every thread was busy and each ran slower than one thread alone
(shared caches, memory bandwidth, a lower all-core clock), not idle.

"memory stream": the package's scale kernel over 256 MiB, the machine's
memory bandwidth at each count; "strm%": a row's speed-up over the stream's
(a kernel that only moves memory, like AdamW, cannot pass 100%: on a
machine whose bandwidth does not double with the cores, neither can it).

Load-independent columns, from one extra run at 1 thread with the pool's
counters on (ab_pool_stats): "par%1", the share of the row's wall time spent
in parallel regions (work more threads could share), and "bnd@16", the
speed-up on 16 threads those regions' task counts allow if their tasks were
equal (the serial rest kept): an upper bound that a busy 2-core machine can
still measure.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

from . import cases as K

SGEMM_SIZE = 1024          # the large sgemm: [1024, 1024] x [1024, 1024]


def add_arguments(p):
    p.add_argument("--scaling", action="store_true",
                   help="thread scaling: each kernel and the full step at 1..N threads")
    p.add_argument("--threads-list", help="with --scaling: comma-separated thread counts "
                                          "(default 1..cores)")
    p.add_argument("--with-load", action="store_true",
                   help="with --scaling: run one CPU-bound process alongside (started and "
                        "stopped by the bench)")


def _counts(spec):
    if not spec:
        return list(range(1, (os.cpu_count() or 1) + 1))
    try:
        out = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"anebackward bench: --threads-list must be integers, got {spec!r}")
    if not out or any(n < 1 or n > 256 for n in out):
        raise SystemExit(f"anebackward bench: --threads-list entries must be in [1, 256], "
                         f"got {spec!r}")
    return sorted(set(out) | {1})


def amdahl_fit(counts, times):
    """Serial fraction s in [0, 1] fitted to T(n) = T(1)(s + (1-s)/n), least
    squares on 1/speed-up; None with fewer than 2 counts."""
    pts = [(n, times[1] / times[n]) for n in counts if n > 1 and times.get(n)]
    if not pts or not times.get(1):
        return None
    a = np.array([1 - 1 / n for n, _ in pts])
    b = np.array([1 / sp - 1 / n for n, sp in pts])
    s = float(a @ b / (a @ a))
    return min(max(s, 0.0), 1.0)


def amdahl_speedup(s, n):
    return 1.0 / (s + (1.0 - s) / n)


def _step_flops(d):
    """Matmul flops of one training step (forward 1x, backward 2x) plus the
    attention products, counted like the attention rows."""
    D, Hd, L, V, S = d["dim"], d["hidden_dim"], d["n_layers"], d["vocab_size"], d["max_seq_len"]
    H, KV = d["n_heads"], d["n_kv_heads"]
    hd = D // H
    kv = KV * hd
    fwd = 2.0 * S * (L * (2 * D * D + 2 * kv * D + 3 * D * Hd) + D * V)
    attn = L * 7.0 * S * S * hd * H
    return 3 * fwd + attn


def c_entry(fn):
    """A callable making the same C kernel calls as the API call fn() (same
    buffers: the arguments keep them alive), without the Python checks."""
    from .._backend import record_calls
    with record_calls() as calls:
        keep = fn()        # arrays the call allocated stay alive with the replay
    if not calls:
        raise RuntimeError("bench --scaling: the API call made no C kernel call to replay")

    def replay():
        for f, args in calls:
            rc = f(*args)
            if rc:
                raise RuntimeError(f"bench --scaling: C kernel returned error {rc}")
    replay.keep = keep
    return replay


def python_overhead():
    """Seconds a Python API call costs beyond its C kernel (tiny rmsnorm)."""
    import anebackward as ab
    x, w = np.ones((1, 8), np.float32), np.ones(8, np.float32)
    y = np.empty_like(x)
    api = lambda: ab.rmsnorm(x, w, out=y)    # noqa: E731
    c = c_entry(api)
    best = {}
    for name, f in (("api", api), ("c", c)):
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(2000):
                f()
            ts.append((time.perf_counter() - t0) / 2000)
        best[name] = float(np.median(ts))
    return max(best["api"] - best["c"], 0.0)


def _model_step(model, opt, tokens):
    model.forward(tokens)
    model.backward()
    model.clip_grad_norm(1.0)
    opt.step()


def _rows(shape, kernels):
    """(label, flops, fn, reset) per row."""
    import anebackward as ab
    rng = np.random.default_rng(0)
    out = []
    for case in K.cases([shape], [k for k in kernels if k != "full_step"]):
        inp = K.inputs(case, rng)
        fn, reset = K.api_callable(case, K.KernelOps(ab, "auto"), inp, True)
        if reset:
            reset()
        fn = c_entry(fn)
        out.append((f"{case.kernel} {case.label}", case.flops, fn, reset))
    if "full_step" in kernels:
        s = K.SHAPES[shape]
        cfg = K.model_config(s)
        model = ab.Llama(ab.LlamaConfig(**cfg), seed=0)
        opt = ab.AdamW(model, lr=K.ADAMW["lr"], betas=(K.ADAMW["beta1"], K.ADAMW["beta2"]),
                       eps=K.ADAMW["eps"], weight_decay=K.ADAMW["weight_decay"])
        tokens = rng.integers(0, s["vocab_size"], s["seq"]).astype(np.int32)
        out.append((f"full_step {shape}", _step_flops(cfg),
                    lambda: _model_step(model, opt, tokens), None))
    return out


def _sgemm_row():
    import anebackward as ab
    n = SGEMM_SIZE
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, n), dtype=np.float32)
    W = rng.standard_normal((n, n), dtype=np.float32)
    y = np.empty((n, n), np.float32)
    return (f"sgemm {n}^3 (ours, tiled)", 2.0 * n ** 3, lambda: ab.linear(x, W, out=y), None)


STREAM_FLOATS = 64 << 20   # the memory stream row: x *= 1 over 256 MiB


def _stream_row():
    """The machine's memory-bandwidth scaling, the ceiling of the streaming
    kernels (grad_norm, clip, AdamW move far more bytes than they compute):
    the package's scale kernel (x *= 1: read and write) over a buffer far
    beyond the caches, called through cffi like the kernel rows."""
    from .._native import ffi, lib
    x = np.ones(STREAM_FLOATS, np.float32)
    px = ffi.from_buffer("float[]", x)

    def fn():
        if lib.ab_scale(px, STREAM_FLOATS, 1.0):
            raise RuntimeError("bench --scaling: ab_scale failed")
    fn.keep = x
    return f"memory stream (scale, {STREAM_FLOATS * 4 >> 20} MiB)", fn


def _set_ours(n):
    import anebackward as ab
    ab.set_num_threads(n)


def _set_blas_own(n):
    """The package at 1 thread, OpenBLAS itself at n (its own pool)."""
    import anebackward as ab
    from anebackward._native import lib
    ab.set_num_threads(1)
    lib.ab_blas_set_num_threads(n)


def _measure(fn, reset, counts, repeats, min_sample, set_threads=_set_ours):
    """{n: median seconds per call}, thread counts interleaved per round."""
    inner = {}
    for n in counts:                       # warm up, size the inner loop
        set_threads(n)
        if reset:
            reset()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        inner[n] = 1 if reset else max(1, min(1000, int(min_sample / max(dt, 1e-7))))
    samples = {n: [] for n in counts}
    busy = {n: [] for n in counts}
    for r in range(repeats):
        order = counts[r % len(counts):] + counts[:r % len(counts)]
        for n in order:
            set_threads(n)
            if reset:
                reset()
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(inner[n]):
                fn()
            wall = time.perf_counter() - t0
            samples[n].append(wall / inner[n])
            busy[n].append((time.process_time() - c0) / (n * wall))
    out = {n: float(np.median(v)) for n, v in samples.items()}
    _measure.utilization = {str(n): float(np.median(v)) for n, v in busy.items()}
    return out


def _structure(fn, reset, min_sample):
    """At 1 thread: the share of the wall time spent in the pool's parallel
    regions, and the speed-ups on 2, 4, 8, 16 threads that the regions' task
    counts allow if every task took the same time (serial part kept)."""
    import anebackward as ab
    from anebackward._native import ffi, lib
    ab.set_num_threads(1)
    ns, bound = ffi.new("int64_t*"), ffi.new("int64_t[4]")
    wall, calls = 0.0, 0
    lib.ab_pool_stats(1, ffi.NULL, ffi.NULL, ffi.NULL)
    try:
        while wall < min_sample or calls == 0:
            if reset:
                lib.ab_pool_stats(0, ffi.NULL, ffi.NULL, ffi.NULL)
                reset()
                lib.ab_pool_stats(2, ffi.NULL, ffi.NULL, ffi.NULL)   # on, not reset
            t0 = time.perf_counter()
            fn()
            wall += time.perf_counter() - t0
            calls += 1
    finally:
        lib.ab_pool_stats(0, ns, ffi.NULL, bound)
    par = min(ns[0] * 1e-9, wall)
    serial = wall - par
    return {"parallel_share_1": par / wall,
            "bound_speedup": {str(k): wall / (serial + min(bound[i] * 1e-9, par))
                              for i, k in enumerate((2, 4, 8, 16))}}


def _start_load():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _write_json(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def run(args):
    import anebackward as ab
    counts = _counts(args.threads_list)
    default = ab.get_num_threads()
    shapes = [s.strip() for s in (args.shapes or "stories110M").split(",") if s.strip()]
    for s in shapes:
        if s not in K.SHAPES:
            raise SystemExit(f"anebackward bench: unknown shape {s!r}; choose from "
                             f"{', '.join(K.SHAPES)}")
    allk = K.KERNELS + ("full_step",)
    if args.kernels:
        import fnmatch
        pats = [p.strip() for p in args.kernels.split(",") if p.strip()]
        kernels = tuple(k for k in allk if any(fnmatch.fnmatch(k, p) for p in pats))
    else:
        kernels = allk
    repeats = args.repeats or (3 if args.quick else 7)
    min_sample = 0.002 if args.quick else 0.02
    load = _start_load() if args.with_load else None
    try:
        with open("/proc/loadavg") as f:
            loadavg = f.read().split()[:3]
    except OSError:
        loadavg = None
    env = {"threads_list": counts, "default_threads": default, "cpu_count": os.cpu_count(),
           "with_load": bool(load), "loadavg_at_start": loadavg, "repeats": repeats,
           "blas": ab.blas_info(), "python": sys.version.split()[0]}
    print(f"thread scaling: counts {counts} (default {default}), {os.cpu_count()} cores, "
          f"load average {loadavg}, {'one CPU-bound process alongside' if load else 'no extra load'}"
          f", median of {repeats}")
    records = []
    try:
        env["python_overhead_s"] = python_overhead()
        print(f"kernel rows: the C entry points (replayed through cffi); the Python API adds "
              f"{env['python_overhead_s'] * 1e6:.1f} us of checks per call")
        # the reference rate: the faster of our tiled sgemm and OpenBLAS's own threads
        label, flops, fn, _ = _sgemm_row()
        sg_t = _measure(fn, None, counts, repeats, min_sample)
        own_t = _measure(fn, None, counts, repeats, min_sample, _set_blas_own)
        sg_rate = {n: flops / min(sg_t[n], own_t[n]) for n in counts}
        records.append(_record(label, flops, sg_t, counts, sg_rate))
        records.append(_record(f"sgemm {SGEMM_SIZE}^3 (OpenBLAS threads)", flops, own_t, counts,
                               sg_rate))
        label, fn = _stream_row()
        st_t = _measure(fn, None, counts, repeats, min_sample)
        records.append(_record(label, None, st_t, counts, sg_rate))
        records[-1]["bandwidth_GBps"] = {str(n): 8.0 * STREAM_FLOATS / st_t[n] / 1e9
                                         for n in counts}
        stream_speedup = records[-1]["speedup"]
        _print_header(counts)
        for shape in shapes:
            for label, flops, fn, reset in _rows(shape, kernels):
                times = _measure(fn, reset, counts, repeats, min_sample)
                records.append(_record(label, flops, times, counts, sg_rate))
                records[-1]["cpu_utilization"] = _measure.utilization
                records[-1]["speedup_over_stream"] = {n: records[-1]["speedup"][n] / stream_speedup[n]
                                                      for n in records[-1]["speedup"]}
                records[-1].update(_structure(fn, reset, min_sample))
                _print_row(records[-1], counts)
    finally:
        ab.set_num_threads(default)
        if load is not None:
            load.terminate()
            load.wait()
    for r in records[:3]:
        _print_row(r, counts)
    bw = records[2]["bandwidth_GBps"]
    print("memory stream: " + ", ".join(f"{bw[str(n)]:.1f} GB/s at {n}" for n in counts)
          + "; strm%: a row's speed-up over the stream's at the same count (a kernel that "
            "only streams memory cannot pass 100%)")
    if args.json:
        _write_json(args.json, {"environment": env, "records": records,
                                "method": __doc__})
        print(f"wrote {args.json} ({len(records)} records)")
    return 0


def _record(label, flops, times, counts, sg_rate):
    s = amdahl_fit(counts, times)
    return {
        "name": label, "flops": flops,
        "median_s": {str(n): times[n] for n in counts},
        "speedup": {str(n): times[1] / times[n] for n in counts},
        "serial_fraction": s,
        "projected_speedup_16": amdahl_speedup(s, 16) if s is not None else None,
        "fraction_of_sgemm_rate": ({str(n): flops / times[n] / sg_rate[n] for n in counts}
                                   if flops else None),
    }


def _print_header(counts):
    head = f"{'row':38s}" + "".join(f"{f'{n} thr ms':>11s}" for n in counts)
    head += "".join(f"{f'x{n}':>7s}" for n in counts[1:])
    head += f"{'serial':>8s}{'@16':>7s}" + "".join(f"{f'sgemm%{n}':>9s}" for n in counts)
    head += f"{'par%1':>7s}{'bnd@16':>8s}{f'strm%{counts[-1]}':>8s}{f'cpu%{counts[-1]}':>7s}"
    print(head)


def _print_row(r, counts):
    line = f"{r['name'][:38]:38s}" + "".join(f"{r['median_s'][str(n)] * 1e3:11.3f}" for n in counts)
    line += "".join(f"{r['speedup'][str(n)]:7.2f}" for n in counts[1:])
    s = r["serial_fraction"]
    line += f"{s:8.3f}{r['projected_speedup_16']:7.1f}" if s is not None else f"{'-':>8s}{'-':>7s}"
    fr = r["fraction_of_sgemm_rate"]
    line += "".join(f"{fr[str(n)] * 100:8.0f}%" if fr else f"{'-':>9s}" for n in counts)
    if "parallel_share_1" in r:
        line += f"{r['parallel_share_1'] * 100:6.1f}%{r['bound_speedup']['16']:8.1f}"
    if "speedup_over_stream" in r and len(counts) > 1:
        line += f"{r['speedup_over_stream'][str(counts[-1])] * 100:7.0f}%"
    if "cpu_utilization" in r:
        line += f"{r['cpu_utilization'][str(counts[-1])] * 100:6.0f}%"
    print(line, flush=True)
