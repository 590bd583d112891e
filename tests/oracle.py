"""Independent float64 NumPy implementations of every kernel's math, and
central finite differences. These are the tests' oracle (the seed is not)."""
import numpy as np


def f64(a):
    return np.asarray(a, dtype=np.float64)


# ---- forward maps (float64) ----
def linear(x, W):
    return f64(x) @ f64(W).T


def rmsnorm(x, w, eps=1e-5):
    x = f64(x)
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x * r * f64(w)


def rope_angles(S, head_dim, pos_offset=0):
    """llama2.c angles: freq formed in float32, pos*freq in float32."""
    i = np.arange(0, head_dim, 2)
    freq = (np.float32(1.0) / np.power(np.float32(10000.0),
                                        (i.astype(np.float32) / np.float32(head_dim)))).astype(np.float32)
    pos = np.arange(pos_offset, pos_offset + S, dtype=np.float32)
    return (pos[:, None] * freq[None, :]).astype(np.float32).astype(np.float64)  # [S, hd/2]


def rope_inv_freq(head_dim, theta=10000.0, scaling=None):
    """Frequencies in float64: theta^(-2k/head_dim), then Llama-3 scaling as
    Meta's reference describes it (long wavelengths divided by factor, short
    kept, a linear blend in 1/wavelength between)."""
    f = 1.0 / np.power(float(theta), np.arange(0, head_dim, 2) / head_dim)
    if scaling is None:
        return f
    L = scaling["original_max_position_embeddings"]
    lo, hi, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    wavelen = 2 * np.pi / f
    smooth = (L / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * f / factor + smooth * f
    return np.where(wavelen > L / lo, f / factor, np.where(wavelen < L / hi, f, blended))


def rope(x, head_dim, pos_offset=0, inverse=False, layout="interleaved", inv_freq=None):
    """inv_freq: float32 frequencies (default llama2.c's); angles pos*freq are
    formed in float32 as llama2.c and HF both do, the rotation in float64.
    layout "half" pairs (k, k + head_dim/2) (HF rotate_half)."""
    x = f64(x)
    S = x.shape[-2]
    if inv_freq is None:
        a = rope_angles(S, head_dim, pos_offset)
    else:
        pos = np.arange(pos_offset, pos_offset + S, dtype=np.float32)
        a = (pos[:, None] * np.asarray(inv_freq, np.float32)[None, :]).astype(np.float64)
    c, s = np.cos(a), np.sin(a)
    if inverse:
        s = -s
    c = c[:, None, :]
    s = s[:, None, :]
    if layout == "half":
        xr = x.reshape(x.shape[:-1] + (-1, 2, head_dim // 2))
        x0, x1 = xr[..., 0, :], xr[..., 1, :]
        y = np.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-2)
        return y.reshape(x.shape)
    xr = x.reshape(x.shape[:-1] + (-1, head_dim // 2, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    y = np.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return y.reshape(x.shape)


def attention(q, k, v, n_heads, n_kv_heads=None):
    q, k, v = f64(q), f64(k), f64(v)
    n_kv_heads = n_kv_heads or n_heads
    squeeze = q.ndim == 2
    if squeeze:
        q, k, v = q[None], k[None], v[None]
    B, S, _ = q.shape
    hd = q.shape[-1] // n_heads
    qh = q.reshape(B, S, n_heads, hd).transpose(0, 2, 1, 3)
    kh = np.repeat(k.reshape(B, S, n_kv_heads, hd).transpose(0, 2, 1, 3), n_heads // n_kv_heads, axis=1)
    vh = np.repeat(v.reshape(B, S, n_kv_heads, hd).transpose(0, 2, 1, 3), n_heads // n_kv_heads, axis=1)
    sc = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(hd)
    sc = np.where(np.tril(np.ones((S, S), bool)), sc, -np.inf)
    sc = sc - sc.max(-1, keepdims=True)
    p = np.exp(sc)
    p /= p.sum(-1, keepdims=True)
    o = (p @ vh).transpose(0, 2, 1, 3).reshape(B, S, n_heads * hd)
    return o[0] if squeeze else o


def silu(a):
    a = f64(a)
    return a * 0.5 * (1.0 + np.tanh(0.5 * a))   # a*sigmoid(a), no overflow for large |a|


def swiglu(h1, h3):
    return silu(h1) * f64(h3)


def cross_entropy(logits, targets):
    z = f64(logits).reshape(-1, np.shape(logits)[-1])
    t = np.asarray(targets).reshape(-1)
    keep = t != -1
    m = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(-1)) + m[:, 0]
    losses = lse - z[np.arange(len(t)), np.where(keep, t, 0)]
    return losses[keep].mean() if keep.any() else np.nan


def cross_entropy_grad(logits, targets):
    z = f64(logits).reshape(-1, np.shape(logits)[-1])
    t = np.asarray(targets).reshape(-1)
    keep = t != -1
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(len(t))[keep], t[keep]] -= 1
    p[~keep] = 0
    return (p / max(keep.sum(), 1)).reshape(np.shape(logits))


# ---- finite differences ----
def numeric_vjp(f, x, dy, eps=1e-6):
    """d/dx of sum(f(x) * dy) by central differences, in float64."""
    x = f64(x).copy()
    g = np.zeros_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = np.sum(f(x) * dy)
        flat[i] = old - eps
        fm = np.sum(f(x) * dy)
        flat[i] = old
        gf[i] = (fp - fm) / (2 * eps)
    return g


def assert_close(actual, expected, rtol=1e-4, atol=1e-5, what=""):
    actual, expected = f64(actual), f64(expected)
    err = np.abs(actual - expected)
    tol = atol + rtol * np.abs(expected)
    if not np.all(err <= tol):
        i = np.unravel_index(np.argmax(err - tol), err.shape) if err.ndim else ()
        raise AssertionError(f"{what} mismatch: max abs err {err.max():.3e} at {i}: "
                             f"actual {actual[i]!r} expected {expected[i]!r} "
                             f"(rtol={rtol}, atol={atol})")
