"""The environment that decides the numbers: CPU, cores, BLAS and the kernel
it picked, thread counts of every contender, OpenBLAS variables, versions."""
import datetime
import os
import platform
import sys

REEXEC_MARK = "ANEBACKWARD_BENCH_UNSET_CORETYPE"   # set by --unset-coretype's re-exec


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def l2_size_kb():
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            s = f.read().strip()
        return int(s[:-1]) * (1024 if s.endswith("M") else 1) if s[-1] in "KM" else int(s) // 1024
    except (OSError, ValueError, IndexError):
        return None


def cpu_busy(seconds=0.5):
    """Share of all cores busy over a short window, from /proc/stat (None
    elsewhere). Taken before the suite starts: on a shared machine it says
    how much of the CPU other processes were using."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle
    try:
        import time
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
        return round(100.0 * (1 - (i1 - i0) / max(t1 - t0, 1)), 1)
    except (OSError, ValueError, IndexError):
        return None


def load_avg():
    """The 1, 5 and 15 minute load averages, as "a b c" (two decimals)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_load():
    """"<n> cpus, load avg a b c (shared machine: timings are noisy)": the
    first line of a script bench, so that its numbers come with the load
    they were measured under."""
    return f"{os.cpu_count()} cpus, load avg {load_avg()} (shared machine: timings are noisy)"


def threadpools():
    """threadpoolctl's view of every BLAS/OpenMP pool in the process, or None."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    return [{k: d.get(k) for k in ("internal_api", "prefix", "filepath", "version", "num_threads",
                                   "architecture", "threading_layer")}
            for d in threadpoolctl.threadpool_info()]


def set_threads(n, torch_mod):
    """The same thread count for every contender. Returns what each says."""
    import anebackward as ab
    limiter = None
    try:
        import threadpoolctl
        limiter = threadpoolctl.threadpool_limits(n)   # NumPy's own OpenBLAS build
    except ImportError:
        pass
    # after threadpoolctl, which set every OpenBLAS it found to n, the package's
    # too: its pool of n runs the sgemm tiles on a single-threaded OpenBLAS
    # (the raw sgemm contender gets OpenBLAS's own n threads per call:
    # cases.sgemm_callable)
    ab.set_num_threads(n)
    if torch_mod is not None:
        torch_mod.set_num_threads(n)
    return limiter


def collect(args, torch_mod, torch_note, threads):
    import numpy as np
    import anebackward as ab
    info = ab.blas_info()
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cpu_busy_before_pct": cpu_busy(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "anebackward": ab.__version__,
        "build_flags": info["build_flags"],
        "blas": info["blas"],
        "blas_core": info["corename"],
        "numpy": np.__version__,
        "torch": torch_mod.__version__ if torch_mod is not None else None,
        "torch_note": torch_note,
        "threads_requested": threads,
        "threads": {
            "ours (the package's pool)": ab.get_num_threads(),
            "sgemm (OpenBLAS's own threads)": ab.get_num_threads(),
            "reference": 1,
            "numpy": None,
            "torch": torch_mod.get_num_threads() if torch_mod is not None else None,
        },
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "omp_wait_policy_set_by_bench": bool(os.environ.get("ANEBACKWARD_BENCH_SET_OMP_WAIT")),
        "coretype_unset_by_bench": os.environ.get(REEXEC_MARK),
        "threadpools": threadpools(),
        "command": "python -m anebackward " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"]
                   else "python -m anebackward bench",
    }
    pools = env["threadpools"] or []
    numpy_pool = [p for p in pools if "numpy" in (p.get("filepath") or "")]
    if numpy_pool:
        env["threads"]["numpy"] = numpy_pool[0]["num_threads"]
    return env


def describe(env):
    """Human-readable lines for the top of the table."""
    t = env["threads"]
    lines = [
        f"date        {env['date_utc']}",
        f"machine     {env['cpu']}, {env['cores']} cores ({env['cores_usable']} usable), "
        f"load avg {env['load_avg']}, CPU busy before start {env['cpu_busy_before_pct']}% "
        f"(other processes)",
        f"package     anebackward {env['anebackward']}  flags: {env['build_flags']}",
        f"BLAS        {env['blas']}, core {env['blas_core']}",
        f"OpenBLAS    OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']!s}  "
        f"OPENBLAS_L2_SIZE={env['OPENBLAS_L2_SIZE']!s}"
        + (f"  (CORETYPE unset by --unset-coretype; it was {env['coretype_unset_by_bench']})"
           if env["coretype_unset_by_bench"] else ""),
        f"OpenMP      OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']!s}"
        + ("  (set by the bench: spinning torch workers starve the BLAS pools on 2 cores)"
           if env["omp_wait_policy_set_by_bench"] else ""),
        f"versions    python {env['python']}, numpy {env['numpy']}, torch "
        f"{env['torch'] or 'not loaded (see torch line)'}",
        "threads     " + ", ".join(f"{k}: {v if v is not None else '?'}" for k, v in t.items()),
    ]
    if env["torch_note"]:
        lines.append(f"torch       {env['torch_note']}")
    for p in env["threadpools"] or []:
        lines.append(f"threadpool  {p['internal_api']} {p['version']} [{p['architecture']}] "
                     f"{p['num_threads']} threads: {os.path.basename(p['filepath'] or '')}")
    if env["threadpools"] is None:
        lines.append("threadpool  threadpoolctl not installed (pip install threadpoolctl): NumPy's BLAS "
                     "threads not controlled or reported")
    import textwrap   # at most 100 columns, continuation lines under the values
    return [w for line in lines for w in textwrap.wrap(line, 100, subsequent_indent=" " * 12,
                                                          break_on_hyphens=False)]
