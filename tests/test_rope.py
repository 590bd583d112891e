"""rope / rope_backward vs float64 NumPy (llama2.c angles) and finite differences."""
import numpy as np
import pytest

import anebackward as ab
from oracle import assert_close, f64, numeric_vjp, rope as rope_ref

CASES = [((1, 8), 8, 0), ((37, 12), 6, 0), ((2, 37, 12), 4, 5), ((3, 5, 16), 16, 1000)]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape,head_dim,pos", CASES)
def test_rope_matches_float64(rng, backend, shape, head_dim, pos):
    x = rng.standard_normal(shape, dtype=np.float32)
    assert_close(ab.rope(x, head_dim=head_dim, pos_offset=pos, backend=backend),
                 rope_ref(x, head_dim, pos), what="rope")
    dy = rng.standard_normal(shape, dtype=np.float32)
    dx = ab.rope_backward(dy, head_dim=head_dim, pos_offset=pos, backend=backend)
    assert_close(dx, numeric_vjp(lambda x_: rope_ref(x_, head_dim, pos), x, f64(dy)),
                 rtol=1e-4, atol=1e-5, what="rope_backward vs FD")


def test_backward_inverts_forward_and_works_in_place(rng):
    x = rng.standard_normal((2, 9, 24), dtype=np.float32)
    y = ab.rope(x, head_dim=8, pos_offset=3)
    z = y.copy()
    assert ab.rope_backward(z, head_dim=8, pos_offset=3, dx=z) is z
    assert_close(z, x, atol=1e-5, what="inverse rotation")


def test_position_zero_is_identity_and_pairs_are_interleaved():
    x = np.arange(8, dtype=np.float32)[None, :].repeat(2, 0)
    y = ab.rope(x, head_dim=8)
    assert np.array_equal(y[0], x[0])
    # position 1, pair 0 rotates by exactly 1 radian (freq 1): (x0, x1) = (0, 1)
    assert_close(y[1, :2], [-np.sin(1.0), np.cos(1.0)], atol=1e-6, what="pair 0 at pos 1")
