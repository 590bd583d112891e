"""clip_grad_norm and adamw_step vs float64 NumPy and torch.optim.AdamW."""
import numpy as np
import pytest

import anebackward as ab
from oracle import assert_close, f64


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_clip_scales_to_max_norm(rng, backend):
    gs = [rng.standard_normal(s, dtype=np.float32) for s in ((3, 4), (17,), (2, 2, 5))]
    total = np.sqrt(sum((f64(g) ** 2).sum() for g in gs))
    orig = [g.copy() for g in gs]
    norm = ab.clip_grad_norm(gs, 0.5, backend=backend)
    assert abs(norm - total) < 1e-9 * total + 1e-6
    for g, o in zip(gs, orig):
        assert_close(g, f64(o) * 0.5 / total, what="clipped")
    assert abs(ab.grad_norm(gs) - 0.5) < 1e-5


def test_clip_leaves_small_and_nonfinite_gradients_alone(rng):
    g = rng.standard_normal(10, dtype=np.float32)
    before = g.copy()
    assert ab.clip_grad_norm(g, 1e6) > 0
    assert np.array_equal(g, before)
    g[3] = np.inf
    assert ab.clip_grad_norm(g, 1.0) == np.inf
    assert np.array_equal(g[:3], before[:3])


def _adamw_ref(p, g, m, v, step, lr, b1, b2, eps, wd):
    p, g, m, v = map(f64, (p, g, m, v))
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + eps)
    return p, m, v


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_float64(rng, backend, wd):
    p = rng.standard_normal((5, 7), dtype=np.float32)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    ep, em, ev = p.copy(), m.copy(), v.copy()
    for step in range(1, 4):
        g = rng.standard_normal(p.shape, dtype=np.float32)
        ab.adamw_step(p, g, m, v, step=step, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                      weight_decay=wd, backend=backend)
        ep, em, ev = _adamw_ref(ep, g, em, ev, step, 1e-2, 0.9, 0.95, 1e-8, wd)
    assert_close(p, ep, rtol=1e-5, atol=1e-6, what="param")
    assert_close(m, em, rtol=1e-5, atol=1e-7, what="m")
    assert_close(v, ev, rtol=1e-5, atol=1e-8, what="v")


def test_adamw_matches_torch(torch, rng):
    p = rng.standard_normal(64, dtype=np.float32)
    tp = torch.tensor(p.copy(), requires_grad=True)
    opt = torch.optim.AdamW([tp], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for step in range(1, 6):
        g = rng.standard_normal(64, dtype=np.float32)
        tp.grad = torch.tensor(g)
        opt.step()
        ab.adamw_step(p, g, m, v, step=step, lr=3e-3, beta1=0.9, beta2=0.95, weight_decay=0.1)
    assert_close(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6, what="vs torch AdamW")
