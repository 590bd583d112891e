"""attention / attention_backward: MHA and GQA, batches, odd S, vs float64
NumPy, finite differences, the reference backend and PyTorch autograd."""
import numpy as np
import pytest

import anebackward as ab
from oracle import assert_close, attention as att_ref, f64, numeric_vjp

# (B or None, S, n_heads, n_kv_heads, head_dim)
CASES = [(None, 1, 1, 1, 4), (None, 37, 1, 1, 6), (None, 37, 4, 2, 6), (2, 19, 4, 1, 5),
         (3, 70, 8, 2, 4), (None, 130, 2, 2, 8), (2, 65, 6, 3, 10)]


def _qkv(rng, B, S, H, KV, hd):
    lead = (S,) if B is None else (B, S)
    q = rng.standard_normal(lead + (H * hd,), dtype=np.float32)
    k = rng.standard_normal(lead + (KV * hd,), dtype=np.float32)
    v = rng.standard_normal(lead + (KV * hd,), dtype=np.float32)
    return q, k, v


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("B,S,H,KV,hd", CASES)
def test_attention_matches_float64(rng, backend, B, S, H, KV, hd):
    q, k, v = _qkv(rng, B, S, H, KV, hd)
    out = ab.attention(q, k, v, n_heads=H, n_kv_heads=KV, backend=backend)
    assert_close(out, att_ref(q, k, v, H, KV), atol=2e-5, what="out")


def _vjp_float64(q, k, v, dout, H, KV):
    """Analytic float64 gradients (independent NumPy derivation)."""
    q, k, v, dout = map(f64, (q, k, v, dout))
    squeeze = q.ndim == 2
    if squeeze:
        q, k, v, dout = q[None], k[None], v[None], dout[None]
    B, S, _ = q.shape
    hd = q.shape[-1] // H
    g = H // KV
    sh = lambda a, n: a.reshape(B, S, n, hd).transpose(0, 2, 1, 3)  # noqa: E731
    qh, do = sh(q, H), sh(dout, H)
    kh, vh = np.repeat(sh(k, KV), g, 1), np.repeat(sh(v, KV), g, 1)
    s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((S, S), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dv = p.transpose(0, 1, 3, 2) @ do
    dp = do @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True)) / np.sqrt(hd)
    dq, dk = ds @ kh, ds.transpose(0, 1, 3, 2) @ qh
    un = lambda a, n: a.transpose(0, 2, 1, 3).reshape(B, S, n * hd)  # noqa: E731
    dk = dk.reshape(B, KV, g, S, hd).sum(2)
    dv = dv.reshape(B, KV, g, S, hd).sum(2)
    res = un(dq, H), un(dk, KV), un(dv, KV)
    return tuple(r[0] for r in res) if squeeze else res


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("B,S,H,KV,hd", CASES)
def test_attention_backward_matches_float64(rng, backend, B, S, H, KV, hd):
    q, k, v = _qkv(rng, B, S, H, KV, hd)
    dout = rng.standard_normal(q.shape, dtype=np.float32)
    got = ab.attention_backward(dout, q, k, v, n_heads=H, n_kv_heads=KV, backend=backend)
    for name, a, e in zip(("dq", "dk", "dv"), got, _vjp_float64(q, k, v, dout, H, KV)):
        assert_close(a, e, rtol=2e-4, atol=5e-5, what=name)


@pytest.mark.parametrize("H,KV", [(2, 2), (4, 2), (4, 1)])
def test_attention_backward_matches_finite_differences(rng, H, KV):
    q, k, v = _qkv(rng, None, 6, H, KV, 4)
    dout = rng.standard_normal(q.shape)
    dq, dk, dv = ab.attention_backward(dout.astype(np.float32), q, k, v, n_heads=H, n_kv_heads=KV)
    f = lambda q_, k_, v_: att_ref(q_, k_, v_, H, KV)  # noqa: E731
    assert_close(dq, numeric_vjp(lambda a: f(a, k, v), q, dout), rtol=1e-3, atol=1e-4, what="dq")
    assert_close(dk, numeric_vjp(lambda a: f(q, a, v), k, dout), rtol=1e-3, atol=1e-4, what="dk")
    assert_close(dv, numeric_vjp(lambda a: f(q, k, a), v, dout), rtol=1e-3, atol=1e-4, what="dv")


def test_attention_matches_torch_autograd(torch, rng):
    B, S, H, KV, hd = 2, 33, 4, 2, 8
    q, k, v = _qkv(rng, B, S, H, KV, hd)
    dout = rng.standard_normal(q.shape, dtype=np.float32)
    tq, tk, tv = (torch.tensor(f64(a)).view(B, S, -1, hd).transpose(1, 2).requires_grad_()
                  for a in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(
        tq, tk.repeat_interleave(H // KV, 1), tv.repeat_interleave(H // KV, 1), is_causal=True)
    o = o.transpose(1, 2).reshape(B, S, H * hd)
    o.backward(torch.tensor(f64(dout)))
    assert_close(ab.attention(q, k, v, n_heads=H, n_kv_heads=KV), o.detach().numpy(), atol=2e-5,
                 what="out vs torch")
    got = ab.attention_backward(dout, q, k, v, n_heads=H, n_kv_heads=KV)
    for name, a, t in zip(("dq", "dk", "dv"), got, (tq, tk, tv)):
        e = t.grad.transpose(1, 2).reshape(a.shape).numpy()
        assert_close(a, e, rtol=2e-4, atol=5e-5, what=f"{name} vs torch")


def test_workspace_is_reused_and_outputs_written_in_place(rng):
    q, k, v = _qkv(rng, 2, 40, 4, 2, 6)
    ws = ab.attention_workspace(40)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    res = ab.attention_backward(q, q, k, v, n_heads=4, n_kv_heads=2, dq=dq, dk=dk, dv=dv, workspace=ws)
    assert all(a is b for a, b in zip(res, (dq, dk, dv)))
    again = ab.attention_backward(q, q, k, v, n_heads=4, n_kv_heads=2, workspace=ws)
    for a, b in zip(res, again):
        assert np.array_equal(a, b)


def test_first_row_attends_only_to_itself(rng):
    q, k, v = _qkv(rng, None, 5, 2, 2, 4)
    out = ab.attention(q, k, v, n_heads=2)
    assert_close(out[0], v[0], atol=1e-6, what="row 0 = v[0]")
