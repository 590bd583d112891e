"""linear, linear_backward_dx, linear_backward_dW vs float64 NumPy and finite differences."""
import numpy as np
import pytest

import anebackward as ab
from oracle import assert_close, f64, numeric_vjp

SHAPES = [((1, 5), 3), ((37, 13), 7), ((2, 37, 13), 11), ((3, 4, 24), 40), ((16, 1), 1)]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("xshape,n_out", SHAPES)
def test_linear_forward_and_grads_match_float64(rng, backend, xshape, n_out):
    x = rng.standard_normal(xshape, dtype=np.float32)
    W = rng.standard_normal((n_out, xshape[-1]), dtype=np.float32)
    dy = rng.standard_normal(xshape[:-1] + (n_out,), dtype=np.float32)
    assert_close(ab.linear(x, W, backend=backend), f64(x) @ f64(W).T, what="y")
    assert_close(ab.linear_backward_dx(dy, W, backend=backend), f64(dy) @ f64(W), what="dx")
    dW = f64(dy).reshape(-1, n_out).T @ f64(x).reshape(-1, xshape[-1])
    assert_close(ab.linear_backward_dW(dy, x, backend=backend), dW, what="dW")


def test_linear_grads_match_finite_differences(rng):
    x = rng.standard_normal((5, 6), dtype=np.float32)
    W = rng.standard_normal((4, 6), dtype=np.float32)
    dy = rng.standard_normal((5, 4))
    assert_close(ab.linear_backward_dx(dy.astype(np.float32), W),
                 numeric_vjp(lambda x_: x_ @ f64(W).T, x, dy), what="dx vs FD")
    assert_close(ab.linear_backward_dW(dy.astype(np.float32), x),
                 numeric_vjp(lambda W_: f64(x) @ W_.T, W, dy), what="dW vs FD")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_accumulate_adds_into_given_buffer(rng, backend):
    x = rng.standard_normal((9, 6), dtype=np.float32)
    W = rng.standard_normal((4, 6), dtype=np.float32)
    dy = rng.standard_normal((9, 4), dtype=np.float32)
    dW = np.ones((4, 6), np.float32)
    res = ab.linear_backward_dW(dy, x, dW=dW, accumulate=True, backend=backend)
    assert res is dW
    assert_close(dW, 1 + f64(dy).T @ f64(x), what="dW accumulated")
    dx = np.full((9, 6), 2, np.float32)
    ab.linear_backward_dx(dy, W, dx=dx, accumulate=True, backend=backend)
    assert_close(dx, 2 + f64(dy) @ f64(W), what="dx accumulated")
    # without accumulate the buffer is overwritten, whatever it held
    ab.linear_backward_dx(dy, W, dx=dx, backend=backend)
    assert_close(dx, f64(dy) @ f64(W), what="dx overwritten")


def test_outputs_are_written_in_place(rng):
    x = rng.standard_normal((8, 6), dtype=np.float32)
    W = rng.standard_normal((5, 6), dtype=np.float32)
    y = np.empty((8, 5), np.float32)
    assert np.shares_memory(ab.linear(x, W, out=y), y)
    dx = np.empty_like(x)
    assert np.shares_memory(ab.linear_backward_dx(y, W, dx=dx), dx)


def test_empty_rows_give_zero_weight_gradient():
    x = np.zeros((0, 6), np.float32)
    dy = np.zeros((0, 5), np.float32)
    dW = np.full((5, 6), 7, np.float32)
    ab.linear_backward_dW(dy, x, dW=dW)
    assert not dW.any()
