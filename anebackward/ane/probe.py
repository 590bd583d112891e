"""python -m anebackward.ane.probe — what the Neural Engine of this Mac does
with anebackward's programs, as a report to paste into an issue.

Sections: the machine, availability and the self-test; a shape sweep of
linear_backward_dx against a float64 oracle; what the platform returns when
a result overflows fp16 (inf, a saturated ±65504, or something else) and how
the dispatch handled it; how many programs compile before the platform
refuses (default 150 attempts, beyond the ~119 per-process limit the origin
project reports); CPU against ANE timings (medians). The report has the same
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
        raw = ane.run_mil(ane.mil_linear_dx(n, n, n), np.ascontiguousarray(packed), (1, n, 1, n))
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
            ane.run_mil(ane.mil_linear_dx(S, n_in, n_out), x, (1, n_in, 1, S))
        except Exception as e:
            failure = f"#{done + 1} (S={S}, in={n_in}, out={n_out}): {e}"
            break
        times.append((time.perf_counter() - t) * 1e3)
        done += 1
    out(f"  compiled and ran: {done} of {len(shapes)}")
    out(f"  median compile+load+eval: {statistics.median(times):.1f} ms" if times else "  median: -")
    out(f"  first failure: {failure or 'none'}")
    out(f"  process compiles now: {ane.status()['process_compiles']}")


def timings(ab, ane, out, rng, repeat):
    out(f"[timings] median of {repeat} runs, ms (cpu: BLAS fp32; ane: fp16 W converted per call; "
        "staged: W reused)")
    out(f"  {'N':>5} {'in':>5} {'out':>5}  {'cpu':>9} {'ane':>9} {'staged':>9}  {'cpu/staged':>10}")
    wins = []
    for N, n_in, n_out in SWEEP:
        dy, W, _ = _problem(rng, N, n_in, n_out)
        dx = np.empty((N, n_in), np.float32)
        try:
            cpu = _median_ms(lambda: ab.linear_backward_dx(dy, W, dx=dx, backend="cpu"), repeat)
            a = _median_ms(lambda: ane.linear_backward_dx(dy, W, dx=dx, backend="ane"), repeat)
            s = _median_ms(lambda: ane.linear_backward_dx(dy, W, dx=dx, backend="ane", w_version=1), repeat)
            out(f"  {N:>5} {n_in:>5} {n_out:>5}  {cpu:>9.3f} {a:>9.3f} {s:>9.3f}  {cpu / s:>10.2f}")
            wins.append((2 * N * n_in * n_out, s < cpu))
        except Exception as e:
            out(f"  {N:>5} {n_in:>5} {n_out:>5}  ERROR {e}")
    # the measured rule for "auto": the smallest swept call from which on the
    # staged ANE call beat the CPU in every larger swept call
    flops = [f for i, (f, _) in enumerate(wins) if all(w for _, w in wins[i:])]
    out(f"  auto rule from this sweep: "
        + (f"min_flops = {min(flops)} (ane.configure(min_flops={min(flops)}))" if flops
           else "the ANE won at no swept size (keep backend='cpu')"))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m anebackward.ane.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--emulate", action="store_true", help="run on the software emulator (any OS)")
    p.add_argument("--compiles", type=int, default=150, help="programs to try compiling (default 150)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per shape (default 5)")
    args = p.parse_args(argv)
    if args.compiles < 0 or args.repeat < 1:
        p.error("--compiles must be >= 0 and --repeat >= 1")
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
    timings(ab, ane, out, rng, args.repeat)
    compile_count(ane, out, args.compiles)                 # last: it spends the process's budget
    st = ane.status()
    out(f"[status] fallbacks={st['fallbacks']} overflow_reruns={st['overflow_reruns']} "
        f"load_retries={st['load_retries']} last_error={st['last_error'] or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
