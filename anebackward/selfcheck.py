"""`anebackward selfcheck`: every kernel's gradient against a float64 NumPy
derivation on random inputs, in a few seconds, with a PASS/FAIL line each.
A quick way to check that an install (BLAS, build flags, CPU) computes the
right numbers. Exit status 1 if any check fails."""
import time

import numpy as np

import anebackward as ab


def _f64(a):
    return np.asarray(a, np.float64)


def _rel(a, b):
    a, b = _f64(a), _f64(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _checks(rng, backend):
    S, D, H, KV, hd, hidden, V = 37, 24, 4, 2, 6, 40, 53
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x, W, dy = r(S, D), r(hidden, D), r(S, hidden)
    yield "linear_backward_dx", _rel(ab.linear_backward_dx(dy, W, backend=backend), _f64(dy) @ _f64(W))
    yield "linear_backward_dW", _rel(ab.linear_backward_dW(dy, x, backend=backend), _f64(dy).T @ _f64(x))
    w, g = r(D), r(S, D)
    rr = 1 / np.sqrt((_f64(x) ** 2).mean(-1, keepdims=True) + 1e-5)
    dot = (_f64(g) * _f64(w) * _f64(x)).sum(-1, keepdims=True)
    dx, dw = ab.rmsnorm_backward(g, x, w, backend=backend)
    yield "rmsnorm_backward dx", _rel(dx, _f64(w) * _f64(g) * rr - _f64(x) * dot * rr ** 3 / D)
    yield "rmsnorm_backward dw", _rel(dw, (_f64(g) * _f64(x) * rr).sum(0))
    h1, h3 = r(S, hidden), r(S, hidden)
    s = 1 / (1 + np.exp(-_f64(h1)))
    d1, d3 = ab.swiglu_backward(dy, h1, h3, backend=backend)
    yield "swiglu_backward", max(_rel(d1, _f64(dy) * _f64(h3) * s * (1 + _f64(h1) * (1 - s))),
                                 _rel(d3, _f64(dy) * _f64(h1) * s))
    q, k, v = r(S, H * hd), r(S, KV * hd), r(S, KV * hd)
    o = ab.attention(q, k, v, n_heads=H, n_kv_heads=KV, backend=backend)
    # check via the identity sum(dO * O) derivative w.r.t. v: dv = P^T dO, O = P v
    dq, dk, dv = ab.attention_backward(o, q, k, v, n_heads=H, n_kv_heads=KV, backend=backend)
    eps = 1e-3
    vp = v.copy()
    vp[5, 3] += eps
    vm = v.copy()
    vm[5, 3] -= eps
    f = lambda vv: 0.5 * (_f64(ab.attention(q, k, vv, n_heads=H, n_kv_heads=KV, backend=backend)) ** 2).sum()  # noqa: E731
    yield "attention_backward (finite diff.)", abs((f(vp) - f(vm)) / (2 * eps) - dv[5, 3]) / max(abs(dv[5, 3]), 1)
    logits, t = r(S, V), rng.integers(0, V, S)
    loss, dl = ab.cross_entropy_backward(logits, t, backend=backend)
    p = np.exp(_f64(logits) - _f64(logits).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(S), t] -= 1
    yield "cross_entropy_backward", _rel(dl, p / S)
    xr = ab.rope(q, head_dim=hd, pos_offset=3, backend=backend)
    yield "rope round trip", _rel(ab.rope_backward(xr, head_dim=hd, pos_offset=3, backend=backend), q)


def add_arguments(p):
    p.add_argument("--backend", default="cpu", choices=["cpu", "reference", "auto"],
                   help="backend to check (default: cpu)")
    p.add_argument("--tol", type=float, default=1e-3, help="max relative error (default 1e-3)")


def run(args):
    rng = np.random.default_rng(0)
    info = ab.blas_info()
    print(f"anebackward {ab.__version__}: {info['blas']} core {info['corename']}, "
          f"{info['threads']} threads, backend={args.backend}")
    t0, failed = time.perf_counter(), 0
    for name, err in _checks(rng, args.backend):
        ok = err <= args.tol
        failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {name:36s} rel. error {err:.1e}")
    print(f"{'all checks passed' if not failed else f'{failed} check(s) FAILED'} "
          f"in {time.perf_counter() - t0:.2f} s")
    return 1 if failed else 0

