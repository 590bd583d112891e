"""What is timed: named model shapes, one case per kernel × shape (× matmul
site for the linear kernels), the inputs of each case, and the callables of
the contenders that need no module of their own (ours, the reference backend, raw
sgemm)."""
import ctypes
import os
import sys

import numpy as np

from ..config import PRESETS


def _shape(preset, seq=256, **changes):
    """A bench shape from a model preset; seq = tokens per step."""
    c = PRESETS[preset].replace(**changes)
    return dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                hidden_dim=c.hidden_dim, vocab_size=c.vocab_size, seq=seq)


# Model shapes (llama2.c's stories models and a GQA variant)
SHAPES = {
    "stories15M": _shape("stories15M"),
    "stories110M": _shape("stories110M"),
    "gqa15M": _shape("stories15M", n_kv_heads=2),
    # what --quick runs: small, but with GQA, a hidden size that is no multiple of 8, vocab 512
    "tiny": _shape("tiny", seq=64, dim=64, hidden_dim=172, vocab_size=512),
}
DEFAULT_SHAPES = ("stories15M", "gqa15M", "stories110M")
QUICK_SHAPES = ("tiny",)

LINEAR = ("linear", "linear_backward_dx", "linear_backward_dW")
KERNELS = LINEAR + ("rmsnorm", "rmsnorm_backward", "rope", "rope_backward", "attention",
                    "attention_backward", "swiglu", "swiglu_backward", "cross_entropy",
                    "cross_entropy_backward", "embedding", "embedding_backward", "grad_norm",
                    "clip_grad_norm", "adamw_step")
EXTRA = ("full_step", "call_overhead")
ADAMW = dict(lr=5e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def model_config(s):
    return dict(dim=s["dim"], hidden_dim=s["hidden_dim"], n_layers=s["n_layers"],
                n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"], vocab_size=s["vocab_size"],
                max_seq_len=s["seq"], shared_classifier=True, norm_eps=1e-5)


def n_params(s):
    D, Hd, L, V = s["dim"], s["hidden_dim"], s["n_layers"], s["vocab_size"]
    kv = s["n_kv_heads"] * (D // s["n_heads"])
    return V * D + L * (2 * D * D + 2 * kv * D + 3 * D * Hd + 2 * D) + D


def linear_sites(s):
    """(site, n_in, n_out) of every distinct matmul of one layer + the classifier."""
    D, Hd, V = s["dim"], s["hidden_dim"], s["vocab_size"]
    kv = s["n_kv_heads"] * (D // s["n_heads"])
    sites = [("wq", D, D)]
    if kv != D:
        sites.append(("wk", D, kv))
    sites += [("w1", D, Hd), ("w2", Hd, D), ("cls", D, V)]
    return sites


class Case:
    def __init__(self, kernel, shape, site, dims, flops):
        self.kernel, self.shape, self.site, self.dims, self.flops = kernel, shape, site, dims, flops

    @property
    def label(self):
        return f"{self.shape}" + (f"/{self.site}" if self.site else "")


def cases(shape_names, kernels):
    out = []
    for sh in shape_names:
        s = SHAPES[sh]
        S, D, H, KV = s["seq"], s["dim"], s["n_heads"], s["n_kv_heads"]
        hd = D // H
        for k in kernels:
            if k in LINEAR:
                for site, n_in, n_out in linear_sites(s):
                    out.append(Case(k, sh, site, dict(N=S, n_in=n_in, n_out=n_out),
                                    2.0 * S * n_in * n_out))
            elif k.startswith("attention"):
                # causal: half of the S×S scores. fwd = QKᵀ + PV; bwd = recomputed QKᵀ + dV, dP, dQ, dK
                per = S * S * hd * H
                out.append(Case(k, sh, "", dict(S=S, n_heads=H, n_kv_heads=KV, head_dim=hd),
                                (2.0 if k == "attention" else 5.0) * per))
            elif k.startswith(("rmsnorm", "rope")):
                out.append(Case(k, sh, "", dict(S=S, D=D, head_dim=hd), None))
            elif k.startswith("swiglu"):
                out.append(Case(k, sh, "", dict(S=S, hidden=s["hidden_dim"]), None))
            elif k.startswith(("cross_entropy", "embedding")):
                out.append(Case(k, sh, "", dict(S=S, D=D, vocab=s["vocab_size"]), None))
            elif k in ("grad_norm", "clip_grad_norm", "adamw_step"):
                out.append(Case(k, sh, "", dict(n_params=n_params(s), max_norm=1.0, adamw=ADAMW), None))
            elif k == "full_step":
                out.append(Case(k, sh, "", dict(model_config(s), n_params=n_params(s)), None))
    return out


def inputs(case, rng):
    """The case's input arrays (shared by every contender)."""
    k, d = case.kernel, case.dims
    r = lambda *shape, scale=1.0: (rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
                                   * np.float32(scale))
    if k in LINEAR:
        N, i, o = d["N"], d["n_in"], d["n_out"]
        return dict(x=r(N, i), W=r(o, i, scale=i ** -0.5), dy=r(N, o))
    if k.startswith("attention"):
        S, H, KV, hd = d["S"], d["n_heads"], d["n_kv_heads"], d["head_dim"]
        return dict(q=r(S, H * hd), k=r(S, KV * hd), v=r(S, KV * hd), dout=r(S, H * hd))
    if k.startswith("rmsnorm"):
        return dict(x=r(d["S"], d["D"]), w=r(d["D"]), dy=r(d["S"], d["D"]))
    if k.startswith("rope"):
        return dict(x=r(d["S"], d["D"]), dy=r(d["S"], d["D"]))
    if k.startswith("swiglu"):
        return dict(h1=r(d["S"], d["hidden"]), h3=r(d["S"], d["hidden"]), dy=r(d["S"], d["hidden"]))
    if k.startswith("cross_entropy"):
        tg = rng.integers(0, d["vocab"], d["S"]).astype(np.int32)
        tg[-1] = -1                                      # the last position predicts nothing
        return dict(logits=r(d["S"], d["vocab"], scale=2.0), targets=tg)
    if k.startswith("embedding"):
        return dict(tokens=rng.integers(0, d["vocab"], d["S"]).astype(np.int32),
                    E=r(d["vocab"], d["D"]), dx=r(d["S"], d["D"]))
    P = d["n_params"]
    return dict(param=r(P, scale=0.02), grad=r(P, scale=0.01), m=np.zeros(P, np.float32),
                v=np.zeros(P, np.float32))


def api_callable(case, ops, inp, prealloc):
    """(fn, reset) doing the case through an object with the anebackward
    kernel API (anebackward bound to a backend, or numpy_impl). With
    prealloc, outputs are allocated once and passed (the zero-copy use)."""
    k, d, a = case.kernel, case.dims, inp

    def o(shape_like):  # an output buffer, or nothing for "plain" allocation per call
        return np.empty_like(shape_like) if prealloc else None

    def kw(**outs):
        return {n: v for n, v in outs.items() if v is not None}

    if k == "linear":
        y = np.empty((d["N"], d["n_out"]), np.float32) if prealloc else None
        return (lambda: ops.linear(a["x"], a["W"], **kw(out=y))), None
    if k == "linear_backward_dx":
        dx = o(a["x"])
        return (lambda: ops.linear_backward_dx(a["dy"], a["W"], **kw(dx=dx))), None
    if k == "linear_backward_dW":
        dW = o(a["W"])
        return (lambda: ops.linear_backward_dW(a["dy"], a["x"], **kw(dW=dW))), None
    if k == "rmsnorm":
        y = o(a["x"])
        return (lambda: ops.rmsnorm(a["x"], a["w"], **kw(out=y))), None
    if k == "rmsnorm_backward":
        dx, dw = o(a["x"]), np.zeros_like(a["w"])
        return (lambda: ops.rmsnorm_backward(a["dy"], a["x"], a["w"], dw=dw, accumulate=False,
                                             **kw(dx=dx))), None
    if k == "rope":
        y = o(a["x"])
        return (lambda: ops.rope(a["x"], head_dim=d["head_dim"], **kw(out=y))), None
    if k == "rope_backward":
        dx = o(a["dy"])
        return (lambda: ops.rope_backward(a["dy"], head_dim=d["head_dim"], **kw(dx=dx))), None
    if k.startswith("attention"):
        H, KV = d["n_heads"], d["n_kv_heads"]
        extra = {}
        if prealloc:
            import anebackward as ab
            extra["workspace"] = ab.attention_workspace(d["S"])
        if k == "attention":
            y = o(a["q"])
            return (lambda: ops.attention(a["q"], a["k"], a["v"], n_heads=H, n_kv_heads=KV,
                                          **kw(out=y), **extra)), None
        dq, dk, dv = o(a["q"]), o(a["k"]), o(a["v"])
        return (lambda: ops.attention_backward(a["dout"], a["q"], a["k"], a["v"], n_heads=H,
                                               n_kv_heads=KV, **kw(dq=dq, dk=dk, dv=dv),
                                               **extra)), None
    if k == "swiglu":
        y = o(a["h1"])
        return (lambda: ops.swiglu(a["h1"], a["h3"], **kw(out=y))), None
    if k == "swiglu_backward":
        dh1, dh3 = o(a["h1"]), o(a["h3"])
        return (lambda: ops.swiglu_backward(a["dy"], a["h1"], a["h3"], **kw(dh1=dh1, dh3=dh3))), None
    if k == "cross_entropy":
        return (lambda: ops.cross_entropy(a["logits"], a["targets"])), None
    if k == "cross_entropy_backward":
        dl = o(a["logits"])
        return (lambda: ops.cross_entropy_backward(a["logits"], a["targets"], **kw(dlogits=dl))), None
    if k == "embedding":
        y = np.empty((d["S"], d["D"]), np.float32) if prealloc else None
        return (lambda: ops.embedding(a["tokens"], a["E"], **kw(out=y))), None
    if k == "embedding_backward":
        dE = np.zeros_like(a["E"])
        return (lambda: ops.embedding_backward(a["dx"], a["tokens"], dE=dE, accumulate=True)), None
    if k == "grad_norm":
        return (lambda: ops.grad_norm(a["grad"])), None
    if k == "clip_grad_norm":
        return (lambda: ops.clip_grad_norm(a["grad"], d["max_norm"])), grad_reset(a)
    if k == "adamw_step":
        h = d["adamw"]
        return (lambda: ops.adamw_step(a["param"], a["grad"], a["m"], a["v"], step=10, **h)), None
    raise KeyError(k)


def grad_reset(a):
    """clip scales the gradients in place: restore them before each sample so
    every sample does the same work (the norm is above max_norm)."""
    saved = a.setdefault("grad0", a["grad"].copy())
    return lambda: np.copyto(a["grad"], saved)


class KernelOps:
    """The anebackward API with backend= fixed."""

    def __init__(self, ab, backend):
        self._ab, self._backend = ab, backend

    def __getattr__(self, name):
        f = getattr(self._ab, name)
        b = self._backend
        return lambda *a, **k: f(*a, backend=b, **k)


# ---- raw sgemm: the same OpenBLAS library the package links, called directly ----
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def sgemm_library():
    """(ctypes function scipy_cblas_sgemm, path), or (None, why)."""
    if sys.platform == "darwin":
        return None, "raw sgemm contender is implemented for scipy-openblas32 only"
    try:
        import scipy_openblas32 as sob
    except ImportError as e:
        return None, f"scipy_openblas32 not importable: {e}"
    path = os.path.join(sob.get_lib_dir(), "lib%s.so" % sob.get_library())
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    f = lib.scipy_cblas_sgemm
    i, p, fl = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    f.argtypes = [i, i, i, i, i, i, fl, p, i, p, i, fl, p, i]
    f.restype = None
    return f, path


def sgemm_callable(case, inp, sgemm, threads=1):
    """The linear case's matrix product as one direct cblas_sgemm call
    (row-major) on `threads` of OpenBLAS's own threads; the package's
    setting (OpenBLAS at one thread under its pool) is put back after it."""
    d, a = case.dims, inp
    N, i, o = d["N"], d["n_in"], d["n_out"]
    x, W, dy = a["x"], a["W"], a["dy"]
    p = lambda arr: arr.ctypes.data  # noqa: E731
    if case.kernel == "linear":          # y[N,o] = x[N,i] · W[o,i]ᵀ
        y = np.empty((N, o), np.float32)
        args = (_ROW_MAJOR, _NO_TRANS, _TRANS, N, o, i, 1.0, p(x), i, p(W), i, 0.0, p(y), o)
        keep = y
    elif case.kernel == "linear_backward_dx":   # dx[N,i] = dy[N,o] · W[o,i]
        dx = np.empty((N, i), np.float32)
        args = (_ROW_MAJOR, _NO_TRANS, _NO_TRANS, N, i, o, 1.0, p(dy), o, p(W), i, 0.0, p(dx), i)
        keep = dx
    else:                                       # dW[o,i] = dy[N,o]ᵀ · x[N,i]
        dW = np.empty((o, i), np.float32)
        args = (_ROW_MAJOR, _TRANS, _NO_TRANS, o, i, N, 1.0, p(dy), o, p(x), i, 0.0, p(dW), i)
        keep = dW
    if threads == 1:
        return lambda: (sgemm(*args), keep)[1]
    from .._native import lib

    def call():
        lib.ab_blas_set_num_threads(threads)
        try:
            sgemm(*args)
        finally:
            lib.ab_blas_set_num_threads(1)
        return keep
    return call
