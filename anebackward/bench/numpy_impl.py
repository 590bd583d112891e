"""Plain float32 NumPy implementations of every anebackward kernel, forward
and backward: the "numpy" contender of the benchmark suite.

Same names, arguments and layouts as the anebackward API (token-major rows,
weights [out, in]) so one piece of benchmark code can drive either. This is
what a practitioner would write in NumPy without tricks: matmuls go to
NumPy's own BLAS, everything else is vectorised array arithmetic that
allocates its temporaries. float32 throughout (no float64 upcasts).
"""
import numpy as np

F32 = np.float32


def _rows(a):
    return a.reshape(-1, a.shape[-1])


def _store(g, dst, accumulate):
    """The API's output convention: g itself when no output was passed, else
    written into dst (or added to it with accumulate)."""
    if dst is None:
        return g
    if accumulate:
        dst += g
    else:
        dst[...] = g
    return dst


# ---- linear -------------------------------------------------------------
def linear(x, W, *, out=None):
    return np.matmul(x, W.T, out=out)


def linear_backward_dx(dy, W, *, dx=None, accumulate=False):
    if accumulate:
        dx += dy @ W
        return dx
    return np.matmul(dy, W, out=dx)


def linear_backward_dW(dy, x, *, dW=None, accumulate=False):
    return _store(_rows(dy).T @ _rows(x), dW, accumulate)


# ---- RMSNorm ------------------------------------------------------------
def rmsnorm(x, w, *, eps=1e-5, out=None):
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps))
    return np.multiply(x * r, w, out=out)


def rmsnorm_backward(dy, x, w, *, eps=1e-5, dx=None, dw=None, accumulate=False):
    """The package's convention: the dx and dw given are overwritten, or added
    to with accumulate=True; one not given is a new array."""
    D = x.shape[-1]
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps))
    wdy = w * dy
    c = np.sum(wdy * x, axis=-1, keepdims=True) * (r * r * r) / F32(D)
    g = wdy * r - x * c
    return _store(g, dx, accumulate), _store(np.sum(_rows(dy * x * r), axis=0), dw, accumulate)


# ---- RoPE (llama2.c convention: pairs (2i, 2i+1) of each head) -----------
_rope_cache: dict = {}


def _cos_sin(S, head_dim, pos_offset):
    key = (S, head_dim, pos_offset)
    if key not in _rope_cache:
        i = np.arange(0, head_dim, 2, dtype=F32)
        freq = F32(1.0) / np.power(F32(10000.0), i / F32(head_dim))
        ang = np.arange(pos_offset, pos_offset + S, dtype=F32)[:, None] * freq[None, :]
        _rope_cache[key] = (np.cos(ang)[:, None, :], np.sin(ang)[:, None, :])  # [S, 1, hd/2]
    return _rope_cache[key]


def _rotate(x, head_dim, pos_offset, sign, out):
    S = x.shape[-2]
    c, s = _cos_sin(S, head_dim, pos_offset)
    s = s * F32(sign)
    xr = x.reshape(x.shape[:-1] + (-1, head_dim // 2, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    y = np.empty(xr.shape, dtype=F32)
    y[..., 0] = x0 * c - x1 * s
    y[..., 1] = x0 * s + x1 * c
    y = y.reshape(x.shape)
    if out is None:
        return y
    out[...] = y
    return out


def rope(x, *, head_dim, pos_offset=0, out=None):
    return _rotate(x, head_dim, pos_offset, 1.0, out)


def rope_backward(dy, *, head_dim, pos_offset=0, dx=None):
    return _rotate(dy, head_dim, pos_offset, -1.0, dx)


# ---- causal attention, MHA and GQA -----------------------------------------
def _heads(a, n, hd):
    """[B?, S, n*hd] -> [B, n, S, hd]"""
    a3 = a if a.ndim == 3 else a[None]
    B, S, _ = a3.shape
    return a3.reshape(B, S, n, hd).transpose(0, 2, 1, 3)


def _tokens(a, like):
    """[B, n, S, hd] -> the token-major layout of `like`"""
    B, n, S, hd = a.shape
    t = a.transpose(0, 2, 1, 3).reshape(B, S, n * hd)
    return t if like.ndim == 3 else t[0]


def _probs(q, k, n_heads, n_kv_heads):
    hd = q.shape[-1] // n_heads
    rep = n_heads // n_kv_heads
    qh = _heads(q, n_heads, hd)                       # [B, H, S, hd]
    B, _, S, _ = qh.shape
    qg = qh.reshape(B, n_kv_heads, rep, S, hd)        # query heads grouped by kv head
    kh = _heads(k, n_kv_heads, hd)[:, :, None]        # [B, KV, 1, S, hd]
    sc = (qg @ kh.swapaxes(-1, -2)) * F32(1.0 / np.sqrt(hd))
    sc[..., np.triu(np.ones((S, S), dtype=bool), 1)] = -np.inf
    sc -= sc.max(axis=-1, keepdims=True)
    p = np.exp(sc)
    p /= p.sum(axis=-1, keepdims=True)
    return qg, kh, p, hd


def attention(q, k, v, *, n_heads, n_kv_heads=None, out=None):
    n_kv_heads = n_kv_heads or n_heads
    _, _, p, hd = _probs(q, k, n_heads, n_kv_heads)
    vh = _heads(v, n_kv_heads, hd)[:, :, None]
    o = p @ vh                                          # [B, KV, rep, S, hd]
    B, KV, rep, S, _ = o.shape
    y = _tokens(o.reshape(B, KV * rep, S, hd), q)
    if out is None:
        return y
    out[...] = y
    return out


def attention_backward(dout, q, k, v, *, n_heads, n_kv_heads=None):
    n_kv_heads = n_kv_heads or n_heads
    qg, kh, p, hd = _probs(q, k, n_heads, n_kv_heads)
    B, KV, rep, S, _ = qg.shape
    vh = _heads(v, n_kv_heads, hd)[:, :, None]
    dog = _heads(dout, n_heads, hd).reshape(B, KV, rep, S, hd)
    dv = (p.swapaxes(-1, -2) @ dog).sum(axis=2)         # sum over the heads sharing a kv head
    dp = dog @ vh.swapaxes(-1, -2)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * F32(1.0 / np.sqrt(hd))
    dq = ds @ kh
    dk = (ds.swapaxes(-1, -2) @ qg).sum(axis=2)
    return (_tokens(dq.reshape(B, KV * rep, S, hd), q), _tokens(dk, k), _tokens(dv, v))


# ---- SwiGLU -----------------------------------------------------------------
def swiglu(h1, h3, *, out=None):
    s = 1.0 / (1.0 + np.exp(-h1))
    return np.multiply(h1 * s, h3, out=out)


def swiglu_backward(dy, h1, h3):
    s = 1.0 / (1.0 + np.exp(-h1))
    dh1 = dy * h3 * s * (1.0 + h1 * (1.0 - s))
    dh3 = dy * h1 * s
    return dh1, dh3


# ---- cross-entropy (targets -1 are ignored; mean over counted positions) -----
def _ce(logits, targets, want_grad, grad_scale=1.0):
    z = _rows(logits)
    t = targets.reshape(-1)
    keep = t >= 0
    n = int(keep.sum())
    m = z.max(axis=-1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=-1, keepdims=True)
    idx = np.nonzero(keep)[0]
    lse = (np.log(s[:, 0]) + m[:, 0])[idx]
    loss = float(np.sum(lse - z[idx, t[idx]], dtype=np.float64) / n) if n else float("nan")
    if not want_grad:
        return loss
    g = e / s
    g[idx, t[idx]] -= 1.0
    g[~keep] = 0.0
    g *= F32(grad_scale / max(n, 1))
    return loss, g.reshape(logits.shape)


def cross_entropy(logits, targets):
    return _ce(logits, targets, False)


def cross_entropy_backward(logits, targets, *, grad_scale=1.0):
    return _ce(logits, targets, True, grad_scale)


# ---- embedding ----------------------------------------------------------------
def embedding(tokens, E, *, out=None):
    return np.take(E, tokens, axis=0, out=out)


def embedding_backward(dx, tokens, *, dE, accumulate):
    if not accumulate:
        dE[...] = 0.0
    np.add.at(dE, tokens.reshape(-1), _rows(dx))
    return dE


# ---- global-norm clipping and AdamW (torch.optim.AdamW semantics) --------------
def grad_norm(grads):
    if isinstance(grads, np.ndarray):
        grads = [grads]
    return float(np.sqrt(sum(float(np.dot(g.reshape(-1), g.reshape(-1))) for g in grads)))


def clip_grad_norm(grads, max_norm):
    if isinstance(grads, np.ndarray):
        grads = [grads]
    norm = grad_norm(grads)
    if np.isfinite(norm) and norm > max_norm:
        for g in grads:
            g *= F32(max_norm / norm)
    return norm


def adamw_step(param, grad, m, v, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.0):
    param *= F32(1.0 - lr * weight_decay)
    m *= F32(beta1)
    m += F32(1.0 - beta1) * grad
    v *= F32(beta2)
    v += F32(1.0 - beta2) * (grad * grad)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    denom = np.sqrt(v) / F32(np.sqrt(bc2))
    denom += F32(eps)
    param -= F32(lr / bc1) * (m / denom)
    return param
