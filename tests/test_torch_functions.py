"""anebackward.torch Functions: the float32 C path against float64 autograd
of plain torch ops (the oracle), zero-copy, and clear errors for what is not
supported."""
import subprocess
import sys

import numpy as np
import pytest

import anebackward


@pytest.fixture
def at(torch):
    import anebackward.torch as at
    return at


def _t(torch, rng, *shape, dtype=None, grad=True, scale=1.0):
    t = torch.from_numpy((rng.standard_normal(shape) * scale).astype(np.float64))
    t = t.to(dtype or torch.float64)
    return t.requires_grad_(grad)


def _close(torch, actual, expected, what, rtol=2e-4):
    """fp32 result vs float64 oracle: error small relative to the oracle's scale.
    The 1e-12 floor covers a gradient that is exactly zero (attention's dq at
    S = 1), where the float64 oracle leaves round-off of ~1e-17 (on some CPUs)
    that no relative tolerance can match."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, what
    tol = rtol * e.abs().max().item() + 1e-12
    err = (a - e).abs().max().item()
    assert err <= tol, f"{what}: max abs err {err:.3e} > {tol:.3e}"


def _check_f32_vs_f64(torch, fn_ours, fn_oracle, inputs64, what, rtol=2e-4, seed=0):
    """Run ours in float32 and the oracle (plain torch ops, autograd) in
    float64 on the same values; compare the output and every input gradient
    for one random upstream gradient."""
    out64 = fn_oracle(*inputs64)
    g = torch.from_numpy(np.random.default_rng(seed).standard_normal(tuple(out64.shape)))
    grads64 = torch.autograd.grad(out64, inputs64, g)
    in32 = [x.detach().float().requires_grad_(True) for x in inputs64]
    out32 = fn_ours(*in32)
    assert out32.dtype == torch.float32
    grads32 = torch.autograd.grad(out32, in32, g.float())
    _close(torch, out32, out64, f"{what} forward", rtol)
    for i, (a, e) in enumerate(zip(grads32, grads64)):
        _close(torch, a, e, f"{what} grad of input {i}", rtol)


# ---- plain-torch oracles (autograd does their backward) ----
def o_rmsnorm(torch, x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def o_rope(torch, x, head_dim, pos_offset=0):
    S = x.shape[-2]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(pos_offset, pos_offset + S, dtype=torch.float64)[:, None] * freqs
    c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    xr = x.reshape(x.shape[:-1] + (-1, head_dim // 2, 2))
    a, b = xr[..., 0], xr[..., 1]
    return torch.stack([a * c - b * s, a * s + b * c], -1).reshape(x.shape)


def o_attention(torch, q, k, v, H, KV):
    squeeze = q.dim() == 2
    if squeeze:
        q, k, v = q[None], k[None], v[None]
    B, S, _ = q.shape
    hd = q.shape[-1] // H
    qh = q.reshape(B, S, H, hd).transpose(1, 2)
    kh = k.reshape(B, S, KV, hd).transpose(1, 2).repeat_interleave(H // KV, 1)
    vh = v.reshape(B, S, KV, hd).transpose(1, 2).repeat_interleave(H // KV, 1)
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    o = o.transpose(1, 2).reshape(B, S, H * hd)
    return o[0] if squeeze else o


def o_swiglu(torch, h1, h3):
    return torch.nn.functional.silu(h1) * h3


def o_ce(torch, x, W, targets):
    logits = x @ W.t()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, W.shape[0]), targets.reshape(-1),
                                             ignore_index=-1)


# ------------------------------------------- float32 C path vs float64 oracle
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 37, 13), (5, 64)])
def test_rmsnorm_f32(torch, at, rng, shape):
    x, w = _t(torch, rng, *shape), _t(torch, rng, shape[-1])
    _check_f32_vs_f64(torch, lambda x, w: at.rmsnorm(x, w, 1e-5),
                      lambda x, w: o_rmsnorm(torch, x, w, 1e-5), [x, w], f"rmsnorm{shape}")


@pytest.mark.parametrize("shape,hd,off", [((2, 37, 24), 6, 0), ((1, 1, 8), 8, 5), ((9, 16), 4, 2)])
def test_rope_f32(torch, at, rng, shape, hd, off):
    x = _t(torch, rng, *shape)
    _check_f32_vs_f64(torch, lambda x: at.rope(x, hd, off), lambda x: o_rope(torch, x, hd, off),
                      [x], f"rope{shape}")


def o_llama3_freqs(torch, head_dim, theta, scaling):
    """Llama 3's scaled inverse frequencies (HF's rope_type "llama3"): long
    wavelengths divided by factor, short ones kept, a linear blend between."""
    f = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * np.pi / f
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * f / factor + smooth * f
    return torch.where(wavelen > old / lo, f / factor, torch.where(wavelen < old / hi, f, mid))


def o_rope_half(torch, x, head_dim, pos_offset, theta, freqs=None):
    """HF's rotate_half RoPE: pairs (k, k + head_dim/2), angles theta^(-2k/head_dim)
    (or the given inverse frequencies)."""
    S, h = x.shape[-2], head_dim // 2
    f = theta ** (-torch.arange(0, head_dim, 2, dtype=x.dtype) / head_dim) if freqs is None else freqs
    ang = torch.arange(pos_offset, pos_offset + S, dtype=x.dtype)[:, None] * f
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    xh = x.reshape(x.shape[:-1] + (-1, head_dim))
    rot = torch.cat([-xh[..., h:], xh[..., :h]], -1)
    return (xh * cos + rot * sin).reshape(x.shape)


@pytest.mark.parametrize("shape,hd,off,theta", [((2, 37, 24), 6, 0, 10000.0), ((9, 16), 8, 3, 5e5)])
def test_rope_half_layout_f32(torch, at, rng, shape, hd, off, theta):
    x = _t(torch, rng, *shape)
    _check_f32_vs_f64(torch, lambda x: at.rope(x, hd, off, layout="half", theta=theta),
                      lambda x: o_rope_half(torch, x, hd, off, theta), [x], f"rope half{shape}")


def test_rope_llama3_scaling_f32(torch, at, rng):
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 4}
    f = o_llama3_freqs(torch, 8, 500.0, llama3)
    assert (f < 500.0 ** (-torch.arange(0, 8, 2) / 8)).any()   # the scaling changes some
    _check_f32_vs_f64(torch, lambda x: at.rope(x, 8, 2, layout="half", theta=500.0, scaling=llama3),
                      lambda x: o_rope_half(torch, x, 8, 2, 500.0, f), [_t(torch, rng, 2, 5, 16)],
                      "rope llama3")


@pytest.mark.parametrize("B,S,H,KV,hd", [(2, 37, 4, 4, 8), (1, 1, 2, 2, 4), (2, 16, 4, 2, 6),
                                         (1, 19, 8, 2, 4), (1, 9, 1, 1, 5), (1, 3, 4, 1, 2)])
def test_attention_f32(torch, at, rng, B, S, H, KV, hd):
    q = _t(torch, rng, B, S, H * hd)
    k, v = _t(torch, rng, B, S, KV * hd), _t(torch, rng, B, S, KV * hd)
    ws = at.AttentionWorkspace()
    _check_f32_vs_f64(torch, lambda q, k, v: at.attention(q, k, v, H, KV, workspace=ws),
                      lambda q, k, v: o_attention(torch, q, k, v, H, KV), [q, k, v],
                      f"attention B{B} S{S} H{H} KV{KV}")


def test_attention_f32_2d_without_workspace(torch, at, rng):
    q, k, v = (_t(torch, rng, 11, 12) for _ in range(3))
    _check_f32_vs_f64(torch, lambda q, k, v: at.attention(q, k, v, 3),
                      lambda q, k, v: o_attention(torch, q, k, v, 3, 3), [q, k, v], "attention 2-D")


@pytest.mark.parametrize("shape", [(1,), (3, 37), (2, 5, 19)])
def test_swiglu_f32(torch, at, rng, shape):
    h1, h3 = _t(torch, rng, *shape, scale=3.0), _t(torch, rng, *shape)
    _check_f32_vs_f64(torch, lambda a, b: at.swiglu(a, b), lambda a, b: o_swiglu(torch, a, b),
                      [h1, h3], f"swiglu{shape}")


def test_linear_f32(torch, at, rng):
    x, W = _t(torch, rng, 2, 7, 13), _t(torch, rng, 9, 13)
    _check_f32_vs_f64(torch, lambda x, W: at.linear(x, W), lambda x, W: x @ W.t(), [x, W], "linear")


@pytest.mark.parametrize("matmul", ["torch", "anebackward"])
@pytest.mark.parametrize("return_logits", [False, True])
def test_classifier_cross_entropy_f32(torch, at, rng, return_logits, matmul):
    x, W = _t(torch, rng, 2, 9, 16), _t(torch, rng, 101, 16, scale=0.3)
    tg = torch.from_numpy(rng.integers(0, 101, (2, 9)))
    tg[0, 2] = tg[1, 8] = -1

    def ours(x, W):
        out = at.classifier_cross_entropy(x, W, tg, return_logits=return_logits, matmul=matmul)
        return out[0] if return_logits else out

    _check_f32_vs_f64(torch, ours, lambda x, W: o_ce(torch, x, W, tg), [x, W], "classifier CE",
                      rtol=1e-4)


def test_classifier_cross_entropy_grad_through_logits(torch, at, rng):
    """When the returned logits feed another term, their gradient is added."""
    x64, W64 = _t(torch, rng, 6, 8), _t(torch, rng, 11, 8)
    tg = torch.from_numpy(rng.integers(-1, 11, 6))
    zo = x64 @ W64.t()
    lo = torch.nn.functional.cross_entropy(zo, tg, ignore_index=-1) + 0.1 * (zo ** 2).mean()
    go = torch.autograd.grad(lo, (x64, W64))
    x, W = (t.detach().float().requires_grad_() for t in (x64, W64))
    loss, z = at.classifier_cross_entropy(x, W, tg, return_logits=True)
    _close(torch, z, zo, "logits")
    g = torch.autograd.grad(loss + 0.1 * (z ** 2).mean(), (x, W))
    for a, e in zip(g, go):
        _close(torch, a, e, "grad with logits term")
    # only the logits used: the loss's gradient contributes nothing
    loss, z = at.classifier_cross_entropy(x, W, tg, return_logits=True)
    g = torch.autograd.grad(z.sum(), (x, W))
    _close(torch, g[0], torch.ones(6, 11) @ W.detach(), "dx from logits only")


def test_classifier_cross_entropy_no_grad_gives_loss_only(torch, at, rng):
    x, W = _t(torch, rng, 5, 8, dtype=torch.float32), _t(torch, rng, 13, 8, dtype=torch.float32)
    tg = torch.from_numpy(rng.integers(0, 13, 5))
    with torch.no_grad():
        loss = at.classifier_cross_entropy(x, W, tg)
    assert loss.grad_fn is None
    _close(torch, loss, o_ce(torch, x.double(), W.double(), tg), "eval loss", rtol=1e-5)


# ---------------------------------------------------------------- zero copy
def _spy(monkeypatch, name, calls):
    orig = getattr(anebackward, name)

    def spy(*args, **kw):
        calls.append((args, kw))
        return orig(*args, **kw)
    monkeypatch.setattr(anebackward, name, spy)


def test_zero_copy_between_tensors_and_kernels(torch, at, rng, monkeypatch):
    calls = {}
    for name in ("rmsnorm", "rmsnorm_backward", "rope", "attention", "attention_backward",
                 "swiglu", "swiglu_backward", "linear", "cross_entropy_backward"):
        calls[name] = []
        _spy(monkeypatch, name, calls[name])
    shares = np.shares_memory
    x = _t(torch, rng, 2, 5, 8, dtype=torch.float32)
    w = _t(torch, rng, 8, dtype=torch.float32)
    y = at.rmsnorm(x, w)
    (args, kw), = calls["rmsnorm"]
    assert shares(args[0], x.detach().numpy()) and shares(args[1], w.detach().numpy())
    assert shares(kw["out"], y.detach().numpy())
    dy = torch.randn(2, 5, 8)
    y.backward(dy)
    (args, kw), = calls["rmsnorm_backward"]
    assert shares(args[0], dy.numpy()) and shares(args[1], x.detach().numpy())
    assert shares(kw["dx"], x.grad.numpy()) and shares(kw["dw"], w.grad.numpy())

    r = at.rope(x, 4)
    (args, kw), = calls["rope"]
    assert shares(args[0], x.detach().numpy()) and shares(kw["out"], r.detach().numpy())

    q = _t(torch, rng, 2, 5, 8, dtype=torch.float32)
    k = _t(torch, rng, 2, 5, 4, dtype=torch.float32)
    v = _t(torch, rng, 2, 5, 4, dtype=torch.float32)
    o = at.attention(q, k, v, 2, 1)
    (args, kw), = calls["attention"]
    assert all(shares(a, t.detach().numpy()) for a, t in zip(args, (q, k, v)))
    assert shares(kw["out"], o.detach().numpy())
    o.backward(torch.randn(2, 5, 8))
    (args, kw), = calls["attention_backward"]
    assert shares(kw["dq"], q.grad.numpy()) and shares(kw["dk"], k.grad.numpy())

    h1, h3 = (_t(torch, rng, 3, 7, dtype=torch.float32) for _ in range(2))
    s = at.swiglu(h1, h3)
    (args, kw), = calls["swiglu"]
    assert shares(args[0], h1.detach().numpy()) and shares(kw["out"], s.detach().numpy())

    # fused classifier: dlogits is written over the logits buffer (one vocab buffer)
    xx = _t(torch, rng, 4, 8, dtype=torch.float32)
    W = _t(torch, rng, 50, 8, dtype=torch.float32)
    at.classifier_cross_entropy(xx, W, torch.tensor([1, 2, -1, 49]), matmul="anebackward")
    (args, kw), = calls["cross_entropy_backward"]
    (largs, lkw), = calls["linear"]
    assert shares(largs[0], xx.detach().numpy()) and shares(largs[1], W.detach().numpy())
    assert shares(args[0], lkw["out"]) and kw["dlogits"] is args[0]
    at.classifier_cross_entropy(xx, W, torch.tensor([1, 2, -1, 49]))  # torch's mm into our buffer
    (args, kw) = calls["cross_entropy_backward"][1]
    assert kw["dlogits"] is args[0] and args[0].shape == (4, 50)


def test_grad_of_expanded_upstream_gradient(torch, at, rng):
    """autograd hands .sum()'s gradient over as a stride-0 tensor; it works."""
    x = _t(torch, rng, 3, 8, dtype=torch.float32)
    w = torch.ones(8, requires_grad=True)
    at.rmsnorm(x, w).sum().backward()
    x64 = x.detach().double().requires_grad_()
    o_rmsnorm(torch, x64, w.detach().double()).sum().backward()
    _close(torch, x.grad, x64.grad, "dx from sum()")


# ------------------------------------------------------------------- errors
def test_rejects_non_cpu_tensors(torch, at):
    x = torch.empty(2, 4, device="meta")
    with pytest.raises(NotImplementedError, match="CPU"):
        at.rmsnorm(x, torch.empty(4, device="meta"))
    with pytest.raises(NotImplementedError, match="CPU"):
        at.swiglu(x, x)


@pytest.mark.parametrize("dt", ["float16", "bfloat16", "float64", "int32"])
def test_rejects_low_precision_and_integer(torch, at, dt):
    x = torch.ones(2, 4, dtype=getattr(torch, dt))
    with pytest.raises(TypeError, match="float32"):
        at.rmsnorm(x, torch.ones(4, dtype=x.dtype))
    with pytest.raises(TypeError, match="float32"):
        at.attention(x, x, x, 2)


def test_rejects_mixed_dtypes_and_non_contiguous(torch, at):
    with pytest.raises(TypeError, match="h3 must be float32, got torch.float64"):
        at.swiglu(torch.ones(3), torch.ones(3, dtype=torch.float64))
    x = torch.ones(4, 6).t()
    with pytest.raises(ValueError, match="contiguous"):
        at.rmsnorm(x, torch.ones(4))
    with pytest.raises(ValueError, match="k and v"):
        at.attention(torch.ones(3, 8), torch.ones(3, 6), torch.ones(3, 6), 2)
    with pytest.raises(ValueError, match="weight"):
        at.rmsnorm(torch.ones(3, 8), torch.ones(7))
    with pytest.raises(ValueError, match="head_dim"):
        at.rope(torch.ones(3, 6), 3)
    with pytest.raises(ValueError, match="weight"):
        at.linear(torch.ones(3, 8), torch.ones(4, 7))


def test_rejects_bad_targets(torch, at):
    x, W = torch.ones(3, 4), torch.ones(5, 4)
    with pytest.raises(ValueError, match="targets"):
        at.classifier_cross_entropy(x, W, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="targets"):
        at.classifier_cross_entropy(x, W, torch.tensor([0, -2, 1]))
    with pytest.raises(TypeError, match="integer"):
        at.classifier_cross_entropy(x, W, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        at.classifier_cross_entropy(x, W, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="matmul"):
        at.classifier_cross_entropy(x, W, torch.tensor([0, 1, 2]), matmul="blas")


def test_double_backward_is_refused(torch, at, rng):
    x = _t(torch, rng, 2, 4, dtype=torch.float32)
    (g,) = torch.autograd.grad((at.swiglu(x, x) ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        g.sum().backward()


# ------------------------------------------------------------ import hygiene
def test_import_anebackward_does_not_import_torch():
    code = "import sys, anebackward; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_anebackward_torch_without_torch_says_how_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import anebackward.torch\nexcept ImportError as e:\n"
            "    assert 'pip install torch' in str(e), e\nelse:\n    raise SystemExit('imported')")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("chunk_rows,n_items", [(3, None), (4, 23.0), (None, None)])
def test_chunked_classifier_cross_entropy(at, torch, rng, chunk_rows, n_items):
    """Chunks of rows (one of them wholly ignored) against float64 autograd
    of the full logits: loss and both gradients, with a dloss ≠ 1."""
    N, D, V = 13, 8, 37
    x = _t(torch, rng, N, D, dtype=torch.float32)
    W = _t(torch, rng, V, D, dtype=torch.float32, scale=0.5)
    tg = torch.from_numpy(rng.integers(0, V, N))
    tg[3:6] = -1   # with chunk_rows=3 the chunk 3..5 counts nothing
    tg[10] = -1
    loss = at.chunked_classifier_cross_entropy(x, W, tg, n_items=n_items, chunk_rows=chunk_rows)
    (loss * 2.5).backward()
    x64, W64 = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    keep = tg != -1
    ce = torch.nn.functional.cross_entropy(x64[keep] @ W64.t(), tg[keep], reduction="sum")
    ref = ce / (keep.sum() if n_items is None else n_items)
    (ref * 2.5).backward()
    _close(torch, loss, ref, "loss", rtol=1e-5)
    _close(torch, x.grad, x64.grad, "dx", rtol=1e-5)
    _close(torch, W.grad, W64.grad, "dW", rtol=1e-5)
    assert x.grad[3:6].abs().max() == 0
