"""`anebackward bench`: time every kernel (forward and backward) and the full
training step at named model shapes, against the reference backend (the
seed's scalar loops, corrected), plain NumPy (numpy_impl.py), PyTorch eager
on the CPU (torch_impl.py per kernel, torch_llama.py for the full step; when
torch is importable), and a raw sgemm of the same shape.

Ratios are measured in the same run with the contenders interleaved;
"×N" in the table means ours is N times faster than that contender, and
the sgemm column is ours' fraction of the raw sgemm (sgemm time / ours).
Every contender lives in this package, so the installed command has them all.
"""
import fnmatch
import json
import os
import sys
import time

from . import cases as K
from . import env as E
from . import llama_ops, numpy_impl
from . import scaling
from ..__main__ import old_spelling
from .report import plot, precision_of, progress, table
from .timing import Contender, Settler, measure

CONTENDERS = ("ours", "reference", "numpy", "torch", "sgemm", "composed", "ours-bf16", "torch-bf16")
# the full step only: ours at precision="bf16", torch under torch.autocast("cpu", torch.bfloat16)
BF16_CONTENDERS = ("ours-bf16", "torch-bf16")


def add_arguments(p):
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few repeats (under a minute on 2 cores)")
    p.add_argument("--shapes", help="comma-separated shape names (%s)" % ", ".join(K.SHAPES))
    p.add_argument("--kernels", help="comma-separated kernel names or patterns (e.g. 'linear*,"
                                     "full_step'); all: " + ", ".join(K.KERNELS + K.EXTRA))
    p.add_argument("--contenders", help="comma-separated subset of " + ", ".join(CONTENDERS))
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every contender (default: all cores; 1 with --quick)")
    p.add_argument("--repeats", type=int, help="timed samples per contender (default 7, quick 3)")
    p.add_argument("--warmup-calls", dest="warmup", type=int,
                   help="untimed calls per contender before timing (default 2, quick 1)")
    old_spelling(p, "--warmup", "warmup", type=int)
    p.add_argument("--ref-budget", type=float,
                   help="seconds the reference backend may spend per case; a single call above it "
                        "is reported as skipped (too slow) (default 60, quick 0.5)")
    p.add_argument("--settle", type=float, default=0.12,
                   help="seconds to let another contender's BLAS pool go idle before a "
                        "multithreaded contender runs (OpenBLAS workers spin ~0.1 s); 0 = off")
    p.add_argument("--json", metavar="PATH", help="write one record per kernel × shape × contender")
    p.add_argument("--plot", metavar="PATH.png", help="bar chart of the speed-ups (needs matplotlib)")
    p.add_argument("--unset-coretype", action="store_true",
                   help="re-run with OPENBLAS_CORETYPE unset (OpenBLAS detects the CPU itself; "
                        "OPENBLAS_L2_SIZE is set) and say so")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    old_spelling(p, "--quiet", "no_progress", action="store_true")
    scaling.add_arguments(p)


def pool_of(contender, kernel):
    """Which multithreaded pool a contender's work runs on (None: single thread)."""
    blas = kernel in K.LINEAR or kernel.startswith("attention") or kernel == "full_step"
    if contender in ("ours", "sgemm", "composed", "ours-bf16"):
        return "openblas-ours" if blas else None
    if contender == "numpy":
        return "openblas-numpy" if blas or kernel in ("grad_norm", "clip_grad_norm") else None
    if contender in ("torch", "torch-bf16"):
        return "torch"
    return None


def _reexec_without_coretype():
    env = dict(os.environ)
    was = env.pop("OPENBLAS_CORETYPE", None)
    env[E.REEXEC_MARK] = was or "(not set)"
    if "OPENBLAS_L2_SIZE" not in env:
        kb = E.l2_size_kb()
        if kb:
            env["OPENBLAS_L2_SIZE"] = str(kb)
    argv = [a for a in sys.argv[1:] if a != "--unset-coretype"]
    if argv[:1] != ["bench"]:
        argv = ["bench"] + argv
    print(f"--unset-coretype: re-running with OPENBLAS_CORETYPE unset (was {was}), "
          f"OPENBLAS_L2_SIZE={env.get('OPENBLAS_L2_SIZE')}", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "anebackward"] + argv, env)


def _select(names, spec, what, allowed):
    if not spec:
        return list(names)
    pats = [s.strip() for s in spec.split(",") if s.strip()]
    for pat in pats:
        if not any(fnmatch.fnmatch(a, pat) for a in allowed):
            raise SystemExit(f"anebackward bench: unknown {what} {pat!r}; choose from "
                             f"{', '.join(allowed)}")
    return [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in pats)]


def _torch():
    # torch's OpenMP workers spin after each parallel region (libgomp's default
    # wait policy); next to the OpenBLAS pools on a 2-core machine that starves
    # whichever contender runs next and times jump by scheduler ticks. Make
    # them sleep instead, unless the user chose a policy (reported).
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["ANEBACKWARD_BENCH_SET_OMP_WAIT"] = "1"
    try:
        import torch
        return torch, None
    except ImportError as e:
        return None, f"PyTorch not installed ({e}): torch contender skipped (pip install torch)"


def _step_contenders(case, torch_mod, wanted, ref_budget, notes):
    import numpy as np
    import anebackward as ab
    d = case.dims
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, d["vocab_size"], d["max_seq_len"]).astype(np.int32)
    targets = np.append(tokens[1:], -1).astype(np.int32)
    out = []
    config = ab.LlamaConfig(**_cfg_kwargs(d))
    adamw = dict(lr=K.ADAMW["lr"], betas=(K.ADAMW["beta1"], K.ADAMW["beta2"]), eps=K.ADAMW["eps"],
                 weight_decay=K.ADAMW["weight_decay"])
    if "ours" in wanted:
        model = ab.Llama(config, seed=0)
        opt = ab.AdamW(model, **adamw)
        out.append(Contender("ours", lambda: _model_step(model, opt, tokens)))
    if "torch" in wanted and torch_mod is not None:
        from .torch_llama import make_step
        out.append(Contender("torch", make_step(d, tokens, targets, K.ADAMW)))
    from .. import bf16
    why = None if bf16.available() else f"bf16 unavailable: {bf16.describe()}"
    for c in BF16_CONTENDERS:
        if c in wanted and why:
            notes[c] = why
    if "ours-bf16" in wanted and not why:
        model16 = ab.Llama(config, seed=0, precision="bf16")
        opt16 = ab.AdamW(model16, **adamw)
        out.append(Contender("ours-bf16", lambda: _model_step(model16, opt16, tokens)))
        notes["ours-bf16"] = f"bf16 path: {bf16.describe()}"   # which path ran
    if "torch-bf16" in wanted and torch_mod is not None and not why:
        from .torch_llama import make_step
        out.append(Contender("torch-bf16", make_step(d, tokens, targets, K.ADAMW, autocast=True)))
    if "numpy" in wanted:
        m = llama_ops.ComposedLlama(d, numpy_impl)
        out.append(Contender("numpy", lambda: m.step(tokens, targets, K.ADAMW)))
    if "composed" in wanted:
        mc = llama_ops.ComposedLlama(d, K.KernelOps(ab, "auto"))
        out.append(Contender("composed", lambda: mc.step(tokens, targets, K.ADAMW)))
    if "reference" in wanted:   # the seed loops: the whole model with backend="reference"
        mref = ab.Llama(config, seed=0, backend="reference")
        oref = ab.AdamW(mref, **adamw)
        out.append(Contender("reference", lambda: _model_step(mref, oref, tokens),
                             slow_budget_s=ref_budget))
    return out


def _cfg_kwargs(d):
    return {k: d[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                              "vocab_size", "max_seq_len", "shared_classifier", "norm_eps")}


def _model_step(model, opt, tokens):
    """One training step of anebackward.model: forward, backward, clip to 1.0, AdamW."""
    loss = model.forward(tokens)
    model.backward()
    model.clip_grad_norm(1.0)
    opt.step()
    return loss


def _overhead_contenders(wanted, torch_mod):
    """One tiny call (8 floats): the per-call cost of the Python layer."""
    import numpy as np
    import anebackward as ab
    from anebackward._native import fptr, lib
    h1 = np.ones(8, np.float32)
    h3 = np.ones(8, np.float32)
    y = np.empty(8, np.float32)
    out = [Contender("ours", lambda: ab.swiglu(h1, h3, out=y))]
    py, p1, p3 = fptr(y), fptr(h1), fptr(h3)
    out.append(Contender("raw-cffi", lambda: lib.ab_swiglu_forward(py, p1, p3, 8)))
    if "numpy" in wanted:
        out.append(Contender("numpy", lambda: numpy_impl.swiglu(h1, h3, out=y)))
    if "torch" in wanted and torch_mod is not None:
        F = torch_mod.nn.functional
        t1, t3 = torch_mod.from_numpy(h1), torch_mod.from_numpy(h3)
        out.append(Contender("torch", lambda: F.silu(t1) * t3))
    return out


def run(args):
    if args.scaling:
        return scaling.run(args)
    if args.unset_coretype and not os.environ.get(E.REEXEC_MARK):
        _reexec_without_coretype()
    import numpy as np
    import anebackward as ab

    quick = args.quick
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if quick else 7)
    ref_budget = args.ref_budget if args.ref_budget is not None else (0.5 if quick else 60.0)
    min_sample = 0.002 if quick else 0.01
    if repeats < 1 or warmup < 1:
        raise SystemExit("anebackward bench: --repeats and --warmup-calls must be >= 1")
    # --quick runs tiny shapes, where threads only add scheduling noise: 1 thread by default
    threads = args.threads if args.threads is not None else (1 if quick else os.cpu_count() or 1)
    if threads < 1:
        raise SystemExit("anebackward bench: --threads must be >= 1")

    shapes = _select(K.QUICK_SHAPES if quick and not args.shapes else
                     (list(K.SHAPES) if args.shapes else K.DEFAULT_SHAPES),
                     args.shapes, "shape", list(K.SHAPES))
    kernels = _select(K.KERNELS + K.EXTRA, args.kernels, "kernel", K.KERNELS + K.EXTRA)
    wanted = _select(CONTENDERS, args.contenders, "contender", CONTENDERS)
    if "ours" not in wanted:
        wanted.insert(0, "ours")

    torch_mod, torch_note = (_torch() if "torch" in wanted or "torch-bf16" in wanted
                             else (None, "torch contender not selected"))
    notes = {}
    torch_impl = None
    if torch_mod is not None:
        from . import torch_impl
    for c in ("torch", "torch-bf16"):
        if torch_note and c in wanted:
            notes[c] = torch_note
    sgemm, sgemm_where = K.sgemm_library() if "sgemm" in wanted else (None, None)
    if sgemm is None and "sgemm" in wanted:
        notes["sgemm"] = sgemm_where

    limiter = E.set_threads(threads, torch_mod)
    environment = E.collect(args, torch_mod, torch_note, threads)
    environment["sgemm_contender"] = (f"scipy_cblas_sgemm called directly (ctypes) from {sgemm_where}"
                                      if sgemm is not None else notes.get("sgemm"))
    environment["settings"] = dict(quick=quick, warmup=warmup, repeats=repeats,
                                   ref_budget_s=ref_budget, min_sample_s=min_sample,
                                   settle_s=args.settle)
    for line in E.describe(environment):
        print(line)
    print(flush=True)

    todo = K.cases(shapes, [k for k in kernels if k != "call_overhead"])
    if "call_overhead" in kernels:
        todo.insert(0, K.Case("call_overhead", "8 floats", "", dict(n=8), None))
    records = []
    rng = np.random.default_rng(0)
    settler = Settler({} if threads == 1 or args.settle <= 0 else
                      {"openblas-ours": args.settle, "openblas-numpy": args.settle,
                       "torch": min(args.settle, 0.01)})
    show = not args.no_progress and sys.stderr.isatty()
    t_start = time.perf_counter()
    for i, case in enumerate(todo):
        if show:
            progress(i, len(todo), f"{case.kernel} {case.label}", t_start)
        case_notes = dict(notes)
        if case.kernel == "call_overhead":
            cs = _overhead_contenders(wanted, torch_mod)
        elif case.kernel == "full_step":
            cs = _step_contenders(case, torch_mod, wanted, ref_budget, case_notes)
        else:
            inp = K.inputs(case, rng)
            cs = []
            fn, reset = K.api_callable(case, K.KernelOps(ab, "auto"), inp, True)
            cs.append(Contender("ours", fn, reset))
            if "reference" in wanted:
                fn, reset = K.api_callable(case, K.KernelOps(ab, "reference"), inp, True)
                cs.append(Contender("reference", fn, reset, slow_budget_s=ref_budget))
            if "numpy" in wanted:
                fn, reset = K.api_callable(case, numpy_impl, inp, False)
                cs.append(Contender("numpy", fn, reset))
            if "torch" in wanted and torch_impl is not None:
                try:
                    fn = torch_impl.make(case.kernel, inp, case.dims)
                    cs.append(Contender("torch", fn, K.grad_reset(inp) if case.kernel ==
                                        "clip_grad_norm" else None))
                except Exception as e:  # report, do not stop
                    case_notes["torch"] = f"{type(e).__name__}: {e}"
            if "sgemm" in wanted and sgemm is not None and case.kernel in K.LINEAR:
                cs.append(Contender("sgemm", K.sgemm_callable(case, inp, sgemm, threads)))
        for c in cs:
            c.pool = pool_of(c.name, case.kernel)
        res = measure(cs, warmup=warmup, repeats=repeats, min_sample_s=min_sample, settler=settler)
        records.extend(_records(case, res, case_notes, wanted))
        del cs
    if show:
        progress(len(todo), len(todo), "done", t_start)
        print(file=sys.stderr)
    environment["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    print("\n".join(table(records, environment)))
    if args.json:
        _write_json(args.json, environment, records)
        print(f"wrote {args.json} ({len(records)} records)")
    if args.plot:
        msg = plot(args.plot, records)
        print(msg)
    if limiter is not None:
        limiter.restore_original_limits()
    return 0


def _records(case, res, notes, wanted):
    ours = res.get("ours", {})
    om = ours.get("median_s") if ours.get("status") == "ok" else None
    names = list(res) + [n for n in wanted if n not in res and n in notes]
    if case.kernel == "call_overhead":
        names = list(res)
    elif case.kernel not in K.LINEAR:
        names = [n for n in names if n != "sgemm"]
    if case.kernel != "full_step":
        names = [n for n in names if n not in BF16_CONTENDERS]
    out = []
    for name in names:
        r = res.get(name) or {"status": "unavailable", "note": notes.get(name, "")}
        med = r.get("median_s")
        rec = {
            "name": case.kernel, "shape": case.shape, "site": case.site or None,
            "dims": {k: v for k, v in case.dims.items() if k != "adamw"},
            "contender": name, "precision": precision_of(name), "status": r["status"],
            "median_s": med,
            "min_s": r.get("min_s"), "max_s": r.get("max_s"), "repeats": r.get("repeats"),
            "gflops": (case.flops / med / 1e9) if (case.flops and med) else None,
            "ratio_to_ours": (med / om) if (med and om) else None,
            "note": "; ".join(n for n in (r.get("note"), notes.get(name) if name in res else None)
                              if n),
        }
        out.append(rec)
    return out


def _write_json(path, environment, records):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": environment, "ratio_to_ours": "contender median / ours median "
                   "(> 1: ours is faster; for sgemm: ours' fraction of the raw sgemm)",
                   "records": records}, f, indent=1)
    os.replace(tmp, path)   # never a half-written file
