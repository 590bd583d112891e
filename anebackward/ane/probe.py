"""python -m anebackward.ane.probe — what the Neural Engine of this Mac does
with anebackward's programs, as a report to paste into a bug report.

Sections: the machine, availability and the self-test; a shape sweep of
linear_backward_dx against a float64 oracle; what the platform returns when
a result overflows fp16 (inf, a saturated ±65504, or something else) and how
the dispatch handled it; CPU against ANE per call (linear and
linear_backward_dx at the stories15M/110M layer shapes, 256 rows), every
column defined, and the min_flops "auto" should use, derived from that
table by one stated rule; a full training step of each model on the CPU and
on the ANE; how many programs compile before the platform refuses (default
150 attempts, beyond the ~119 per-process limit the origin project
reports). The report has the same
format everywhere; `--emulate` (or ANEBACKWARD_ANE=emulate) runs it on the
software emulator, which is how CI checks this script on Linux.

The probe spends compiles (the limit is per process: run it in its own
process) and takes a minute or so on a Mac."""
import argparse
import os
import platform as _platform
import statistics
import sys
import time

import numpy as np

SWEEP = [(32, 32, 32), (64, 64, 64), (256, 768, 768), (256, 768, 3072)]   # (N, in, out)


def _rel(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _median_ms(fn, repeat):
    fn()                                                   # warm-up: compile, stage, caches
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _machine():
    if sys.platform == "darwin":
        return f"macOS {_platform.mac_ver()[0] or '?'} ({_platform.machine()})"
    return f"{sys.platform} {_platform.release()} ({_platform.machine()})"


def _problem(rng, N, n_in, n_out):
    dy = rng.standard_normal((N, n_out)).astype(np.float32)
    W = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
    return dy, W, dy.astype(np.float64) @ W.astype(np.float64)


def sweep(ane, out, rng):
    out("[shape sweep] dx[N, in] = dy[N, out] · W[out, in], backend='ane', vs float64")
    out(f"  {'N':>5} {'in':>5} {'out':>5}  {'result':<8} {'rel.err':>9}  {'tiles':>5} {'cpu':>3}  fallback")
    for N, n_in, n_out in SWEEP:
        dy, W, ref = _problem(rng, N, n_in, n_out)
        try:
            got = ane.linear_backward_dx(dy, W, backend="ane")
            info = ane.last_call()
            ok = "ok" if _rel(got, ref) < 4e-3 and info["tiles_cpu"] == 0 else "WRONG"
            out(f"  {N:>5} {n_in:>5} {n_out:>5}  {ok:<8} {_rel(got, ref):>9.2e}  {info['tiles']:>5} "
                f"{info['tiles_cpu']:>3}  {info['fallback'] or '-'}")
        except Exception as e:                             # the report shows every failure
            out(f"  {N:>5} {n_in:>5} {n_out:>5}  {'ERROR':<8} {'-':>9}  {'-':>5} {'-':>3}  {e}")


def saturation(ane, out, rng):
    """A result far beyond fp16's range, loss scaling off: the raw program's
    output shows what the platform does; the dispatch's answer must be the
    CPU's."""
    out("[saturation] |dx| ~ 1e5 (fp16 max 65504), loss scaling off")
    n = 64
    dy = np.full((n, n), 40.0, np.float32)
    W = np.full((n, n), 40.0, np.float32)                  # every dx = 64 * 1600 = 102400
    packed = np.concatenate([dy.T, W], axis=1)[None, :, None, :].astype(np.float16)
    try:
        raw = ane.run_mil(ane.mil_linear_dx(n, n, n), np.ascontiguousarray(packed), (1, n, 1, n))   # [1, S, 1, in]
        vals = np.unique(raw.astype(np.float32))
        kind = ("inf" if np.all(np.isinf(vals)) else "saturated at 65504" if np.all(np.abs(vals) == 65504)
                else "zero" if np.all(vals == 0) else "other")
        out(f"  raw program output: {kind} (distinct values: {', '.join(map(str, vals[:4]))})")
    except Exception as e:
        out(f"  raw program output: ERROR {e}")
    prev = ane.configure()["loss_scaling"]
    ane.configure(loss_scaling=False)
    try:
        got = ane.linear_backward_dx(dy, W, backend="ane")
        info = ane.last_call()
        right = np.array_equal(got, dy @ W)
        out(f"  dispatch: fallback={info['fallback'] or '-'}, result {'= CPU' if right else 'WRONG'}")
    except Exception as e:
        out(f"  dispatch: ERROR {e}")
    finally:
        ane.configure(loss_scaling=prev)


def compile_count(ane, out, attempts):
    """Distinct small programs until one fails or `attempts` are done."""
    out(f"[compiles] up to {attempts} distinct programs in this process (the ANE allows ~119)")
    st = ane.status()
    ane.configure(max_programs=st["process_compiles"] + attempts)
    shapes = [(64, 64 * a, 64 * b) for a in range(1, 14) for b in range(1, 14)][:attempts]
    done, times, failure = 0, [], None
    for S, n_in, n_out in shapes:
        x = np.zeros((1, n_out, 1, S + n_in), np.float16)
        t = time.perf_counter()
        try:
            ane.run_mil(ane.mil_linear_dx(S, n_in, n_out), x, (1, S, 1, n_in))
        except Exception as e:
            failure = f"#{done + 1} (S={S}, in={n_in}, out={n_out}): {e}"
            break
        times.append((time.perf_counter() - t) * 1e3)
        done += 1
    out(f"  compiled and ran: {done} of {len(shapes)}")
    out(f"  median compile+load+eval: {statistics.median(times):.1f} ms" if times else "  median: -")
    out(f"  first failure: {failure or 'none'}")
    out(f"  process compiles now: {ane.status()['process_compiles']}")


MODELS = ("stories15M", "stories110M")
TILE = 256                                                 # rows per call: the origin's sequence


def _kernel_shapes(config):
    """(in, out) of the layer projections: wq..wo, w1/w3, w2."""
    D, Hd = config.dim, config.hidden_dim
    return [(D, D), (D, Hd), (Hd, D)]


def timings(ab, ane, out, rng, repeat, models):
    """CPU against ANE per call at the models' layer shapes; the verdict
    (the min_flops "auto" should use) follows from the table by one rule."""
    out(f"[timings] per call, N = {TILE} rows, median of {repeat} runs, the two contenders alternated")
    out("  columns: MFLOP   2·N·in·out / 1e6 of the call")
    out("           cpu     ms, the fp32 CPU kernel (BLAS)")
    out("           ane     ms, the call on the ANE with W staged in fp16 once (w_version fixed, as")
    out("                   the model calls it): CPU staging + evaluation")
    out("           stage   ms of `ane` spent by the CPU staging (packing, fp16 conversion, layout;")
    out("                   last_call()'s t_end_ns - t_start_ns - eval_ns), real CPU work everywhere")
    out("           cpu/ane >1: the ANE call is faster;  faster: the faster of the two")
    out(f"  {'model':<12} {'kernel':<19} {'N':>4} {'in':>5} {'out':>5} {'MFLOP':>8} {'cpu':>8} {'ane':>8} "
        f"{'stage':>7} {'cpu/ane':>8}  faster")
    rows = []
    for name in models:
        config = ab.LlamaConfig.preset(name)
        for n_in, n_out in _kernel_shapes(config):
            for kernel in ("linear", "linear_backward_dx"):
                W = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
                if kernel == "linear":
                    a = rng.standard_normal((TILE, n_in)).astype(np.float32)
                    res = np.empty((TILE, n_out), np.float32)
                    cpu_fn = lambda: ab.linear(a, W, out=res, backend="cpu")
                    ane_fn = lambda: ane.linear(a, W, out=res, backend="ane", w_version=1)
                else:
                    a = rng.standard_normal((TILE, n_out)).astype(np.float32)
                    res = np.empty((TILE, n_in), np.float32)
                    cpu_fn = lambda: ab.linear_backward_dx(a, W, dx=res, backend="cpu")
                    ane_fn = lambda: ane.linear_backward_dx(a, W, dx=res, backend="ane", w_version=1)
                flops = 2 * TILE * n_in * n_out
                try:
                    cpu_fn(), ane_fn()                     # warm-up: compile, stage, caches
                    ct, at, st = [], [], []
                    for _ in range(repeat):
                        t = time.perf_counter(); cpu_fn(); ct.append((time.perf_counter() - t) * 1e3)
                        t = time.perf_counter(); ane_fn(); at.append((time.perf_counter() - t) * 1e3)
                        c = ane.last_call()
                        st.append((c["t_end_ns"] - c["t_start_ns"] - c["eval_ns"]) / 1e6)
                    cpu, a_ms, stage = (statistics.median(v) for v in (ct, at, st))
                    won = a_ms < cpu
                    rows.append((flops, won))
                    out(f"  {name:<12} {kernel:<19} {TILE:>4} {n_in:>5} {n_out:>5} {flops / 1e6:>8.1f} "
                        f"{cpu:>8.3f} {a_ms:>8.3f} {stage:>7.3f} {cpu / a_ms:>8.2f}  {'ane' if won else 'cpu'}")
                except Exception as e:                     # the report shows every failure
                    rows.append((flops, False))
                    out(f"  {name:<12} {kernel:<19} {TILE:>4} {n_in:>5} {n_out:>5} {flops / 1e6:>8.1f}  ERROR {e}")
    # the rule: the smallest FLOP count from which on the ANE was faster in every measured call
    ok = [f for f, _ in rows if all(w for g, w in rows if g >= f)]
    won = sum(w for _, w in rows)
    out(f"  the ANE was faster in {won} of {len(rows)} calls; rule: min_flops = the smallest MFLOP from "
        "which on the ANE was faster in every measured call at least that large")
    if ok:
        out(f"  recommended min_flops = {min(ok)} (ane.configure(min_flops={min(ok)}) with backend='auto')")
    else:
        out("  recommended min_flops: none (the ANE was slower in the largest measured call): keep "
            "backend='cpu'")
    return min(ok) if ok else None


def model_step(ab, ane, out, rng, repeat, models):
    """One training step (forward + backward, B = 1, S = 256) of each model,
    backend="cpu" against backend="ane" (every layer projection on the ANE)."""
    out(f"[model step] forward + backward, B = 1, S = {TILE}, median of {repeat} runs, ms")
    out(f"  {'model':<12} {'cpu':>9} {'ane':>9} {'cpu/ane':>8}  faster")
    for name in models:
        config = ab.LlamaConfig.preset(name).replace(max_seq_len=TILE)
        t = rng.integers(0, config.vocab_size, size=(1, TILE + 1)).astype(np.int32)
        try:
            m = {b: ab.Llama(config, seed=0, backend=b) for b in ("cpu", "ane")}
            times = {b: [] for b in m}
            for i in range(repeat + 1):                    # the first: compile, stage (not counted)
                for b, model in m.items():
                    t0 = time.perf_counter()
                    model.forward(t[:, :-1], t[:, 1:])
                    model.backward()
                    if i:
                        times[b].append((time.perf_counter() - t0) * 1e3)
            cpu, a = statistics.median(times["cpu"]), statistics.median(times["ane"])
            out(f"  {name:<12} {cpu:>9.1f} {a:>9.1f} {cpu / a:>8.2f}  {'ane' if a < cpu else 'cpu'}")
        except Exception as e:
            out(f"  {name:<12} ERROR {e}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m anebackward.ane.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--emulate", action="store_true", help="run on the software emulator (any OS)")
    p.add_argument("--compiles", type=int, default=150, help="programs to try compiling (default 150)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per shape (default 5)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"models whose shapes are timed, comma-separated (default {','.join(MODELS)})")
    args = p.parse_args(argv)
    if args.compiles < 0 or args.repeat < 1:
        p.error("--compiles must be >= 0 and --repeat >= 1")
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        p.error(f"--models: choose from {', '.join(MODELS)}")
    import anebackward as ab
    from anebackward import ane
    if args.emulate:
        ane.use_emulator(True)
    out = print
    st = ane.status()
    out("anebackward ANE probe")
    out(f"  anebackward {getattr(ab, '__version__', '?')}, Python {_platform.python_version()}, numpy {np.__version__}")
    out(f"  machine: {_machine()}")
    out(f"  blas: {ab.blas_info().get('blas', '?')}")
    out(f"  platform: {st['platform'] or '-'}   available: {'yes' if st['available'] else 'no'}")
    out(f"  reason: {st['reason'] or '-'}")
    if st["available"] and st["self_test"] == "not run":
        ane.self_test()
    out(f"  self-test: {ane.status()['self_test'] or '-'}")
    out(f"  fp16 conversion: {st['fp16_path']}")
    if not st["available"]:
        out("the ANE is not available here: nothing more to probe (--emulate runs the emulator)")
        return 1
    rng = np.random.default_rng(0)
    sweep(ane, out, rng)
    saturation(ane, out, rng)
    timings(ab, ane, out, rng, args.repeat, models)
    model_step(ab, ane, out, rng, args.repeat, models)
    compile_count(ane, out, args.compiles)                 # last: it spends the process's budget
    st = ane.status()
    out(f"[status] fallbacks={st['fallbacks']} overflow_reruns={st['overflow_reruns']} "
        f"load_retries={st['load_retries']} last_error={st['last_error'] or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
