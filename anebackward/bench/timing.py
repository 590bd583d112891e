"""Interleaved timing of several contenders doing the same work.

Each contender is probed once (the first warm-up call, also used to size
the inner loop and, for slow contenders, the number of repeats), warmed up,
then timed in rounds: every round runs each contender once, the order
rotating from round to round, so load changes on a shared machine hit all
contenders alike. A sample is the mean of `inner` back-to-back calls (inner
> 1 only for calls much shorter than min_sample_s). Reported: median, min
and max of the samples — nothing is extrapolated.
"""
import math
import statistics
import time

clock = time.perf_counter


class Contender:
    """name, fn (the work, no arguments), reset (untimed, before each
    sample; e.g. restore clipped gradients), slow_budget_s (None, or the
    time this contender may take in total: a probe call above it skips the
    contender as "too slow", and it gets at most budget/probe repeats)."""

    def __init__(self, name, fn, reset=None, slow_budget_s=None, single_call=False, pool=None):
        self.name, self.fn, self.reset, self.pool = name, fn, reset, pool
        self.slow_budget_s = slow_budget_s
        self.single_call = single_call or reset is not None


class Settler:
    """Multithreaded BLAS/OpenMP pools keep their idle workers spinning for
    a while after a call (OpenBLAS: about 2^28 cycles, ~0.1 s). On a 2-core
    machine a spinning pool steals the CPU from the next contender's pool and
    its time jumps by scheduler ticks. So before a contender whose work is
    multithreaded runs, wait until every other pool used in the last
    `window[pool]` seconds has gone idle. Untimed."""

    def __init__(self, windows):
        self.windows = windows          # {pool: seconds}; empty = never wait
        self.last = {}

    def before(self, c):
        if c.pool is None or not self.windows:
            return
        now = clock()
        wait = max((self.last[q] + self.windows.get(q, 0.0) - now
                    for q in self.last if q != c.pool), default=0.0)
        if wait > 0:
            time.sleep(wait)

    def after(self, c):
        if c.pool is not None:
            self.last[c.pool] = clock()


def _sample(c, inner, settler):
    settler.before(c)
    try:
        return _timed(c, inner)
    finally:
        settler.after(c)


def _timed(c, inner):
    if c.reset is not None:
        c.reset()
    fn = c.fn
    t0 = clock()
    for _ in range(inner):
        fn()
    return (clock() - t0) / inner


def measure(contenders, *, warmup, repeats, min_sample_s, settler=None):
    """settler: a Settler kept across cases (None: never wait).
    {name: result dict} for every contender; a contender that raises or
    is too slow gets status "error"/"skipped" and a note instead of times."""
    settler = settler or Settler({})
    results, plan = {}, []
    for c in contenders:
        try:
            probe = _sample(c, 1, settler)
            if c.slow_budget_s is not None and probe > c.slow_budget_s:
                results[c.name] = {"status": "skipped",
                                   "note": f"skipped (too slow: one call took {probe:.3g} s, "
                                           f"budget {c.slow_budget_s:g} s)"}
                continue
            for _ in range(max(0, warmup - 1)):
                _sample(c, 1, settler)
            inner = 1 if c.single_call else max(1, min(10000, math.ceil(min_sample_s / max(probe, 1e-9))))
            n = repeats
            if c.slow_budget_s is not None:
                n = max(1, min(repeats, int(c.slow_budget_s / max(probe, 1e-9))))
            plan.append([c, inner, n, []])
        except Exception as e:  # a contender that fails must not stop the suite
            results[c.name] = {"status": "error", "note": f"{type(e).__name__}: {e}"}
    rounds = max((p[2] for p in plan), default=0)
    for r in range(rounds):
        k = len(plan)
        for j in range(k):
            c, inner, n, samples = plan[(j + r) % k]
            if len(samples) < n:
                try:
                    samples.append(_sample(c, inner, settler))
                except Exception as e:
                    results[c.name] = {"status": "error", "note": f"{type(e).__name__}: {e}"}
                    p = plan[(j + r) % k]
                    p[2] = len(samples)
    for c, inner, n, samples in plan:
        if c.name in results or not samples:
            continue
        note = "" if len(samples) >= repeats else f"{len(samples)} repeat(s) only (slow contender)"
        results[c.name] = {"status": "ok", "median_s": statistics.median(samples),
                           "min_s": min(samples), "max_s": max(samples), "repeats": len(samples),
                           "inner": inner, "note": note}
    return results
