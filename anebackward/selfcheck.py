"""`anebackward selfcheck`: every kernel, forward and backward, and the whole
model's forward against independent float64 NumPy formulas written out here
(RoPE with its base 10000, attention with its 1/sqrt(head_dim) scale, ...),
on random inputs, in about a second, with a PASS/FAIL line each.

A quick way to check that an install (BLAS, build flags, CPU) computes the
right numbers. Nothing is checked against the package itself (no round
trips, no finite differences through its own forward), so a kernel that is
wrong in a self-consistent way still fails. Exit status 1 if any check fails.
"""
import time

import numpy as np

import anebackward as ab

ROPE_BASE = 10000.0   # llama2.c's theta
EPS = 1e-5            # RMSNorm epsilon


def _f64(a):
    return np.asarray(a, np.float64)


def _rel(a, b):
    """max |a - b| / max |b| (b is the float64 formula)."""
    a, b = _f64(a), _f64(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---- float64 formulas (token-major rows, weights [out, in]) ---------------------------
def rmsnorm64(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * w


def rmsnorm_backward64(dy, x, w):
    r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
    dot = (dy * w * x).sum(-1, keepdims=True)
    return w * dy * r - x * dot * r ** 3 / x.shape[-1], (dy * x * r).sum(0)


def rope64(x, head_dim, pos_offset, sign=1.0, base=ROPE_BASE):
    """Rotate pairs (2i, 2i+1) of every head by sign * p * base^(-2i/head_dim)."""
    S = x.shape[0]
    xr = x.reshape(S, -1, head_dim // 2, 2)
    ang = np.outer(np.arange(pos_offset, pos_offset + S),
                   base ** (-np.arange(0, head_dim, 2) / head_dim))[:, None, :] * sign
    c, s = np.cos(ang), np.sin(ang)
    a, b = xr[..., 0], xr[..., 1]
    return np.stack([a * c - b * s, a * s + b * c], -1).reshape(x.shape)


def _heads(t, n, hd):
    return t.reshape(t.shape[0], n, hd).transpose(1, 0, 2)   # [n, S, hd]


def _probs(q, k, H, KV, hd):
    S = q.shape[0]
    qh, kh = _heads(q, H, hd), np.repeat(_heads(k, KV, hd), H // KV, axis=0)
    s = qh @ kh.transpose(0, 2, 1) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((S, S), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def attention64(q, k, v, H, KV):
    hd = q.shape[1] // H
    o = _probs(q, k, H, KV, hd) @ np.repeat(_heads(v, KV, hd), H // KV, axis=0)
    return o.transpose(1, 0, 2).reshape(q.shape)


def attention_backward64(do, q, k, v, H, KV):
    S, hd, rep = q.shape[0], q.shape[1] // H, H // KV
    p = _probs(q, k, H, KV, hd)
    qh, doh = _heads(q, H, hd), _heads(do, H, hd)
    kh, vh = (np.repeat(_heads(t, KV, hd), rep, axis=0) for t in (k, v))
    dp = doh @ vh.transpose(0, 2, 1)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(hd)
    dq = ds @ kh
    dk = (ds.transpose(0, 2, 1) @ qh).reshape(KV, rep, S, hd).sum(1)
    dv = (p.transpose(0, 2, 1) @ doh).reshape(KV, rep, S, hd).sum(1)
    rows = lambda t: t.transpose(1, 0, 2).reshape(S, -1)  # noqa: E731
    return rows(dq), rows(dk), rows(dv)


def silu64(h):
    return h / (1 + np.exp(-h))


def cross_entropy64(logits, targets):
    """Mean loss over targets != -1, and its gradient."""
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    keep = targets >= 0
    n = keep.sum()
    rows = np.arange(len(targets))[keep]
    loss = -logp[rows, targets[keep]].sum() / n
    d = np.exp(logp)
    d[rows, targets[keep]] -= 1
    d[~keep] = 0
    return loss, d / n


def llama_loss64(model, tokens):
    """The model's mean next-token loss, float64, from its parameters."""
    c, P = model.config, {n: _f64(a) for n, a in model.params.items()}
    hd, S = c.head_dim, len(tokens)
    h = P["tok_embeddings.weight"][tokens]
    for i in range(c.n_layers):
        p = f"layers.{i}."
        xn = rmsnorm64(h, P[p + "attention_norm.weight"])
        q, k, v = (xn @ P[p + f"attention.w{n}.weight"].T for n in "qkv")
        att = attention64(rope64(q, hd, 0), rope64(k, hd, 0), v, c.n_heads, c.n_kv_heads)
        h = h + att @ P[p + "attention.wo.weight"].T
        xf = rmsnorm64(h, P[p + "ffn_norm.weight"])
        g = silu64(xf @ P[p + "feed_forward.w1.weight"].T) * (xf @ P[p + "feed_forward.w3.weight"].T)
        h = h + g @ P[p + "feed_forward.w2.weight"].T
    wcls = P["tok_embeddings.weight" if c.shared_classifier else "output.weight"]
    logits = rmsnorm64(h, P["norm.weight"]) @ wcls.T
    return cross_entropy64(logits, np.append(tokens[1:], -1))[0]


# ---- the checks --------------------------------------------------------------------
def _checks(rng, backend):
    S, D, H, KV, hd, hidden, V = 37, 24, 4, 2, 6, 40, 53
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    kw = dict(backend=backend)
    x, W, dy = r(S, D), r(hidden, D), r(S, hidden)
    yield "linear", _rel(ab.linear(x, W, **kw), _f64(x) @ _f64(W).T)
    yield "linear_backward_dx", _rel(ab.linear_backward_dx(dy, W, **kw), _f64(dy) @ _f64(W))
    yield "linear_backward_dW", _rel(ab.linear_backward_dW(dy, x, **kw), _f64(dy).T @ _f64(x))

    w, g = (1 + 0.5 * r(D)), r(S, D)
    yield "rmsnorm", _rel(ab.rmsnorm(x, w, **kw), rmsnorm64(_f64(x), _f64(w)))
    dx, dw = ab.rmsnorm_backward(g, x, w, **kw)
    dx64, dw64 = rmsnorm_backward64(_f64(g), _f64(x), _f64(w))
    yield "rmsnorm_backward dx", _rel(dx, dx64)
    yield "rmsnorm_backward dw", _rel(dw, dw64)

    q, k, v, do = r(S, H * hd), r(S, KV * hd), r(S, KV * hd), r(S, H * hd)
    yield f"rope (base {ROPE_BASE:g})", _rel(ab.rope(q, head_dim=hd, pos_offset=3, **kw),
                                             rope64(_f64(q), hd, 3))
    yield "rope_backward", _rel(ab.rope_backward(do, head_dim=hd, pos_offset=3, **kw),
                                rope64(_f64(do), hd, 3, sign=-1.0))

    q64, k64, v64 = _f64(q), _f64(k), _f64(v)
    yield "attention (scale 1/sqrt(head_dim))", _rel(
        ab.attention(q, k, v, n_heads=H, n_kv_heads=KV, **kw), attention64(q64, k64, v64, H, KV))
    got = ab.attention_backward(do, q, k, v, n_heads=H, n_kv_heads=KV, **kw)
    want = attention_backward64(_f64(do), q64, k64, v64, H, KV)
    yield "attention_backward dq, dk, dv", max(_rel(a, b) for a, b in zip(got, want))

    h1, h3 = r(S, hidden), r(S, hidden)
    s = 1 / (1 + np.exp(-_f64(h1)))
    yield "swiglu", _rel(ab.swiglu(h1, h3, **kw), silu64(_f64(h1)) * _f64(h3))
    d1, d3 = ab.swiglu_backward(dy, h1, h3, **kw)
    yield "swiglu_backward", max(_rel(d1, _f64(dy) * _f64(h3) * s * (1 + _f64(h1) * (1 - s))),
                                 _rel(d3, _f64(dy) * silu64(_f64(h1))))

    logits, t = r(S, V), rng.integers(0, V, S).astype(np.int32)
    t[[2, 11]] = -1                                        # ignored positions
    loss64, dl64 = cross_entropy64(_f64(logits), t)
    yield "cross_entropy", abs(ab.cross_entropy(logits, t, **kw) - loss64) / loss64
    loss, dl = ab.cross_entropy_backward(logits, t, **kw)
    yield "cross_entropy_backward", max(abs(loss - loss64) / loss64, _rel(dl, dl64))

    E, tok = r(V, D), rng.integers(0, V, S).astype(np.int32)
    tok[:4] = tok[4]                                       # repeats must add up
    yield "embedding", _rel(ab.embedding(tok, E, **kw), _f64(E)[tok])
    dE = r(V, D)
    dE64 = _f64(dE)
    np.add.at(dE64, tok, _f64(x))
    yield "embedding_backward (accumulates)", _rel(ab.embedding_backward(x, tok, dE=dE, accumulate=True, **kw), dE64)

    grads = [r(7, 5), r(31)]
    norm64 = np.sqrt(sum((_f64(a) ** 2).sum() for a in grads))
    yield "grad_norm", abs(ab.grad_norm(grads, **kw) - norm64) / norm64
    before = [_f64(a) for a in grads]
    n = ab.clip_grad_norm(grads, 0.5, **kw)
    yield "clip_grad_norm", max([abs(n - norm64) / norm64] +
                                [_rel(a, b * 0.5 / norm64) for a, b in zip(grads, before)])

    p, gr, m, vv = r(101), r(101), 0.1 * r(101), np.abs(0.1 * r(101))
    p64, g64, m64, v64 = (_f64(a) for a in (p, gr, m, vv))
    lr, b1, b2, eps, wd, step = 1e-2, 0.9, 0.95, 1e-8, 0.1, 3
    m64 = b1 * m64 + (1 - b1) * g64
    v64 = b2 * v64 + (1 - b2) * g64 * g64
    p64 = p64 * (1 - lr * wd) - lr * (m64 / (1 - b1 ** step)) / (np.sqrt(v64 / (1 - b2 ** step)) + eps)
    ab.adamw_step(p, gr, m, vv, step=step, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, **kw)
    yield "adamw_step", max(_rel(p, p64), _rel(m, m64), _rel(vv, v64))

    cfg = ab.LlamaConfig(dim=24, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=2,
                         vocab_size=V, max_seq_len=S)
    model = ab.Llama(cfg, seed=0, backend=backend)
    model.flat_params[:model.n_decay] *= 10                # away from the init's near-uniform loss
    tokens = rng.integers(0, V, S)
    loss64 = llama_loss64(model, tokens)
    yield "Llama.forward (whole model)", abs(model.forward(tokens, want_grad=False) - loss64) / loss64


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
