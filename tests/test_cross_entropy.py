"""cross_entropy(_backward): fused loss + dlogits vs float64 and torch."""
import numpy as np
import pytest

import anebackward as ab
from oracle import assert_close, cross_entropy as ce_ref, cross_entropy_grad, f64, numeric_vjp


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape", [(1, 5), (37, 101), (2, 7, 33), (3, 32000)])
def test_loss_and_dlogits_match_float64(rng, backend, shape):
    logits = 4 * rng.standard_normal(shape, dtype=np.float32)
    targets = rng.integers(0, shape[-1], shape[:-1])
    loss, d = ab.cross_entropy_backward(logits, targets, backend=backend)
    assert abs(loss - ce_ref(logits, targets)) < 1e-5 * max(1, abs(loss))
    assert_close(d, cross_entropy_grad(logits, targets), atol=1e-7, rtol=1e-4, what="dlogits")
    assert abs(ab.cross_entropy(logits, targets, backend=backend) - loss) < 1e-6


def test_dlogits_match_finite_differences(rng):
    logits = rng.standard_normal((4, 9), dtype=np.float32)
    targets = np.array([3, 0, 8, 2])
    _, d = ab.cross_entropy_backward(logits, targets)
    fd = numeric_vjp(lambda z: np.array(ce_ref(z, targets)), logits, 1.0)
    assert_close(d, fd, rtol=1e-4, atol=1e-6, what="dlogits vs FD")


def test_ignored_targets_and_in_place(rng):
    logits = rng.standard_normal((6, 10), dtype=np.float32)
    targets = np.array([1, -1, 4, 9, -1, 0], dtype=np.int64)
    expect_loss = ce_ref(logits, targets)
    expect_grad = cross_entropy_grad(logits, targets)
    loss, d = ab.cross_entropy_backward(logits, targets, dlogits=logits)
    assert d is logits
    assert abs(loss - expect_loss) < 1e-5
    assert_close(d, expect_grad, atol=1e-7, what="in-place dlogits")
    assert not d[1].any() and not d[4].any()


def test_all_ignored_gives_nan_loss_and_zero_grad():
    logits = np.ones((2, 3), np.float32)
    loss, d = ab.cross_entropy_backward(logits, np.array([-1, -1]))
    assert np.isnan(loss) and not d.any()


def test_numerically_stable_for_huge_logits():
    logits = np.array([[1e4, 0, -1e4], [-3e4, 3e4, 0]], np.float32)
    loss, d = ab.cross_entropy_backward(logits, np.array([0, 2]))
    assert np.isfinite(loss) and np.isfinite(d).all()
    assert abs(loss - 1.5e4) < 1


def test_grad_scale(rng):
    logits = rng.standard_normal((3, 5), dtype=np.float32)
    t = np.array([0, 1, 2])
    _, d1 = ab.cross_entropy_backward(logits, t)
    _, d2 = ab.cross_entropy_backward(logits, t, grad_scale=0.25)
    assert_close(d2, 0.25 * f64(d1), what="grad_scale")


def test_matches_torch(torch, rng):
    logits = 3 * rng.standard_normal((8, 50), dtype=np.float32)
    t = rng.integers(0, 50, 8)
    t[2] = -1
    z = torch.tensor(f64(logits), requires_grad=True)
    ref = torch.nn.functional.cross_entropy(z, torch.tensor(t), ignore_index=-1)
    ref.backward()
    loss, d = ab.cross_entropy_backward(logits, t)
    assert abs(loss - ref.item()) < 1e-5
    assert_close(d, z.grad.numpy(), atol=1e-7, what="vs torch")
