"""rmsnorm / rmsnorm_backward vs float64 NumPy and finite differences, and
the two seed defects (docs/kernels.md, "Seed function → kernel") that live in this kernel."""
import numpy as np
import pytest

import anebackward as ab
from oracle import assert_close, f64, numeric_vjp, rmsnorm as rms_ref

SHAPES = [(1, 5), (37, 13), (2, 37, 13), (4, 64), (3, 2, 7)]


def _case(rng, shape):
    x = rng.standard_normal(shape, dtype=np.float32)
    w = (1 + 0.5 * rng.standard_normal(shape[-1])).astype(np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    return x, w, dy


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_matches_float64_and_finite_differences(rng, backend, shape):
    x, w, dy = _case(rng, shape)
    assert_close(ab.rmsnorm(x, w, backend=backend), rms_ref(x, w), what="y")
    dx, dw = ab.rmsnorm_backward(dy, x, w, backend=backend)
    assert_close(dx, numeric_vjp(lambda x_: rms_ref(x_, w), x, f64(dy)), rtol=1e-3, atol=1e-4, what="dx")
    assert_close(dw, numeric_vjp(lambda w_: rms_ref(x, w_), w, f64(dy)), rtol=1e-3, atol=1e-4, what="dw")


def test_eps_is_used(rng):
    x, w, dy = _case(rng, (3, 8))
    x *= 1e-3
    assert_close(ab.rmsnorm(x, w, eps=1e-2), rms_ref(x, w, eps=1e-2), what="y eps=1e-2")
    dx, _ = ab.rmsnorm_backward(dy, x, w, eps=1e-2)
    assert_close(dx, numeric_vjp(lambda x_: rms_ref(x_, w, 1e-2), x, f64(dy), eps=1e-8),
                 rtol=1e-3, atol=1e-3, what="dx eps=1e-2")


def test_dw_accumulates_and_dx_accumulate_flag(rng):
    x, w, dy = _case(rng, (5, 6))
    dx0, dw0 = ab.rmsnorm_backward(dy, x, w)
    dw = np.ones(6, np.float32)
    dx = np.full((5, 6), 3, np.float32)
    rdx, rdw = ab.rmsnorm_backward(dy, x, w, dx=dx, dw=dw, accumulate=True)
    assert rdx is dx and rdw is dw
    assert_close(dw, 1 + f64(dw0), what="dw accumulated")
    assert_close(dx, 3 + f64(dx0), what="dx accumulated")


# ---- seed defects (docs/kernels.md, "Seed function → kernel") ----
def _seed_rmsnorm_dx(dy, x, w, eps=1e-5):
    """The seed's cpu_rmsnorm_backward formula: correction divided by D*rms^2."""
    x, w, dy = f64(x), f64(w), f64(dy)
    D = x.shape[-1]
    rms = np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    dot = (dy * w * x).sum(-1, keepdims=True) / (D * rms * rms)
    return dy * w / rms - x * dot


def test_seed_defect_rms_cubed(rng):
    """The seed divides by D·rms² instead of D·rms³: its dx fails the
    finite-difference check, ours passes (on inputs with rms far from 1)."""
    x, w, dy = _case(rng, (4, 16))
    x *= 3.0
    fd = numeric_vjp(lambda x_: rms_ref(x_, w), x, f64(dy))
    with pytest.raises(AssertionError):
        assert_close(_seed_rmsnorm_dx(dy, x, w), fd, rtol=1e-3, atol=1e-4, what="seed dx")
    for backend in ("cpu", "reference"):
        dx, _ = ab.rmsnorm_backward(dy, x, w, backend=backend)
        assert_close(dx, fd, rtol=1e-3, atol=1e-4, what=f"{backend} dx")


def test_seed_defect_norm_weight_gradient_is_computed(rng):
    """The seed never computed the RMSNorm weight gradient (it stayed 0)."""
    x, w, dy = _case(rng, (6, 10))
    _, dw = ab.rmsnorm_backward(dy, x, w)
    fd = numeric_vjp(lambda w_: rms_ref(x, w_), w, f64(dy))
    assert np.abs(fd).max() > 0.1          # the true gradient is far from zero
    assert_close(dw, fd, rtol=1e-3, atol=1e-4, what="dw")
