"""swiglu / swiglu_backward vs float64 NumPy, finite differences and torch."""
import numpy as np
import pytest

import anebackward as ab
from oracle import assert_close, f64, numeric_vjp, swiglu as swiglu_ref


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape", [(1, 3), (37, 13), (2, 5, 24), (7,)])
def test_swiglu_matches_float64_and_finite_differences(rng, backend, shape):
    h1 = 3 * rng.standard_normal(shape, dtype=np.float32)
    h3 = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    assert_close(ab.swiglu(h1, h3, backend=backend), swiglu_ref(h1, h3), what="y")
    dh1, dh3 = ab.swiglu_backward(dy, h1, h3, backend=backend)
    assert_close(dh1, numeric_vjp(lambda a: swiglu_ref(a, h3), h1, f64(dy)), rtol=1e-4, atol=1e-5, what="dh1")
    assert_close(dh3, numeric_vjp(lambda a: swiglu_ref(h1, a), h3, f64(dy)), rtol=1e-4, atol=1e-5, what="dh3")


def test_extreme_inputs_stay_finite_and_nan_propagates():
    h1 = np.array([-1000, -90, -20, 0, 20, 90, 1000, np.nan], np.float32)
    h3 = np.ones_like(h1)
    y = ab.swiglu(h1, h3)
    assert_close(y[:-1], swiglu_ref(h1[:-1], h3[:-1]), atol=1e-6, what="extremes")
    assert np.isnan(y[-1])
    dh1, dh3 = ab.swiglu_backward(np.ones_like(h1), h1, h3)
    assert np.isfinite(dh1[:-1]).all() and np.isnan(dh1[-1])


def test_backward_in_place_over_dy(rng):
    h1, h3, dy = (rng.standard_normal((4, 9), dtype=np.float32) for _ in range(3))
    e1, e3 = ab.swiglu_backward(dy, h1, h3)
    d = dy.copy()
    g1, g3 = ab.swiglu_backward(d, h1, h3, dh1=d)
    assert g1 is d
    assert np.array_equal(g1, e1) and np.array_equal(g3, e3)


def test_swiglu_matches_torch(torch, rng):
    h1, h3, dy = (rng.standard_normal((5, 11), dtype=np.float32) for _ in range(3))
    t1, t3 = (torch.tensor(f64(a), requires_grad=True) for a in (h1, h3))
    (torch.nn.functional.silu(t1) * t3).backward(torch.tensor(f64(dy)))
    dh1, dh3 = ab.swiglu_backward(dy, h1, h3)
    assert_close(dh1, t1.grad.numpy(), what="dh1 vs torch")
    assert_close(dh3, t3.grad.numpy(), what="dh3 vs torch")
