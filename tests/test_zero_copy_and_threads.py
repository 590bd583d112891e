"""Outputs are the caller's arrays (the C code writes the NumPy memory), and
kernels called from 4 Python threads at once give the serial results (no
hidden shared scratch; the GIL is released during the C call)."""
import threading

import numpy as np

import anebackward as ab
from anebackward._native import ffi, lib


def _same(got, out, fresh):
    """got is the caller's out array (same memory) and holds what a call
    without out= computes."""
    assert np.shares_memory(got, out)
    np.testing.assert_array_equal(got, fresh)


def test_every_output_argument_is_written_in_place(rng):
    a = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    x, W, w, q, h, g3 = a(5, 8), a(3, 8), a(8), a(5, 8), a(5, 8), a(5, 3)
    E = a(9, 8)
    e = lambda *s: np.full(s, np.nan, np.float32)  # noqa: E731  (stale contents)
    o = e(5, 3)
    _same(ab.linear(x, W, out=o), o, ab.linear(x, W))
    o = e(5, 8)
    _same(ab.linear_backward_dx(g3, W, dx=o), o, ab.linear_backward_dx(g3, W))
    o = e(3, 8)
    _same(ab.linear_backward_dW(g3, x, dW=o), o, ab.linear_backward_dW(g3, x))
    o = e(5, 8)
    _same(ab.rmsnorm(x, w, out=o), o, ab.rmsnorm(x, w))
    dx, dw = e(5, 8), e(8)
    r = ab.rmsnorm_backward(h, x, w, dx=dx, dw=dw, accumulate=False)
    fresh = ab.rmsnorm_backward(h, x, w)
    _same(r[0], dx, fresh[0])
    _same(r[1], dw, fresh[1])
    o = e(5, 8)
    _same(ab.rope(q, head_dim=4, out=o), o, ab.rope(q, head_dim=4))
    _same(ab.rope_backward(q, head_dim=4, dx=o), o, ab.rope_backward(q, head_dim=4))
    o = e(5, 8)
    _same(ab.attention(q, x, h, n_heads=2, out=o), o, ab.attention(q, x, h, n_heads=2))
    outs = [e(5, 8) for _ in range(3)]
    r = ab.attention_backward(q, q, x, h, n_heads=2, dq=outs[0], dk=outs[1], dv=outs[2])
    for got, out, fresh in zip(r, outs, ab.attention_backward(q, q, x, h, n_heads=2)):
        _same(got, out, fresh)
    o = e(5, 8)
    _same(ab.swiglu(x, h, out=o), o, ab.swiglu(x, h))
    d1, d3 = e(5, 8), e(5, 8)
    r, fresh = ab.swiglu_backward(q, x, h, dh1=d1, dh3=d3), ab.swiglu_backward(q, x, h)
    _same(r[0], d1, fresh[0])
    _same(r[1], d3, fresh[1])
    logits = a(5, 8)
    fresh = ab.cross_entropy_backward(logits, np.arange(5))
    loss, got = ab.cross_entropy_backward(logits, np.arange(5), dlogits=logits)
    _same(got, logits, fresh[1])
    assert loss == fresh[0]
    o = e(5, 8)
    _same(ab.embedding(np.arange(5), E, out=o), o, ab.embedding(np.arange(5), E))
    dE = e(9, 8)
    _same(ab.embedding_backward(x, np.arange(5), dE=dE, accumulate=False), dE,
          ab.embedding_backward(x, np.arange(5), dE=np.zeros((9, 8), np.float32), accumulate=True))
    p, gp = a(7), a(7)
    p2 = p.copy()
    z = lambda: np.zeros(7, np.float32)  # noqa: E731
    _same(ab.adamw_step(p, gp, z(), z(), step=1, lr=1e-3), p,
          ab.adamw_step(p2, gp, z(), z(), step=1, lr=1e-3))


def test_c_receives_the_numpy_data_pointer(rng):
    x = rng.standard_normal((4, 4), dtype=np.float32)
    assert int(ffi.cast("uintptr_t", ffi.from_buffer("float[]", x))) == x.ctypes.data


def _work(seed):
    r = np.random.default_rng(seed)
    S, H, KV, hd = 64, 4, 2, 16
    q = r.standard_normal((2, S, H * hd), dtype=np.float32)
    k = r.standard_normal((2, S, KV * hd), dtype=np.float32)
    v = r.standard_normal((2, S, KV * hd), dtype=np.float32)
    W = r.standard_normal((96, H * hd), dtype=np.float32)
    w = r.standard_normal(H * hd, dtype=np.float32)
    logits = r.standard_normal((2 * S, 500), dtype=np.float32)
    t = r.integers(0, 500, 2 * S)
    out = []
    for _ in range(3):
        o = ab.attention(q, k, v, n_heads=H, n_kv_heads=KV)
        out += list(ab.attention_backward(o, q, k, v, n_heads=H, n_kv_heads=KV))
        y = ab.linear(ab.rmsnorm(o, w), W)
        out += [y, ab.linear_backward_dW(y, o), *ab.rmsnorm_backward(o, q, w)]
        out += [ab.cross_entropy_backward(logits, t)[1]]
    return out


def test_four_threads_match_serial():
    serial = [_work(s) for s in range(4)]
    results = [None] * 4

    def run(i):
        results[i] = _work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s, r in zip(serial, results):
        for a, b in zip(s, r):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_c_guards_return_error_codes_instead_of_crashing():
    """The C layer checks its own preconditions (NULL, negative sizes, bad
    heads, small workspace) and returns a code; it never aborts."""
    assert lib.ab_linear_forward(ffi.NULL, ffi.NULL, ffi.NULL, 2, 2, 2) == lib.AB_ENULL
    buf = ffi.new("float[16]")
    assert lib.ab_rmsnorm_forward(buf, buf, buf, -1, 4, 1e-5) == lib.AB_EINVAL
    assert lib.ab_attention_forward(buf, buf, buf, buf, 1, 2, 3, 2, 2, buf, 8) == lib.AB_EINVAL
    assert lib.ab_attention_forward(buf, buf, buf, buf, 1, 4, 1, 1, 2, buf, 3) == lib.AB_EWORKSPACE
    tok = ffi.new("int32_t[2]", [0, 7])
    assert lib.ab_embedding_forward(buf, buf, tok, 2, 4, 2) == lib.AB_ERANGE
    assert lib.ab_linear_forward(buf, buf, buf, 2**31, 1, 1) == lib.AB_ETOOBIG
    assert "BLAS" in ffi.string(lib.ab_strerror(lib.AB_ETOOBIG)).decode()
