"""The reference backend (csrc/reference/seed_loops.c) at the edges of its
number ranges: large activations and gradients (scale before cubing or
squaring, as the fast kernels do), positions and sizes whose products
overflow int64 (bounded before they are multiplied)."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import anebackward as ab


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("scale", [1.0, 1e13, 1e15, 1e17])
def test_rmsnorm_backward_keeps_its_correction_term_for_large_inputs(backend, scale):
    """rms(x) > ~7e12 made rms^3 overflow float in the reference, dropping the
    correction term (relative error 0.66 at 1e15)."""
    rng = np.random.default_rng(0)
    D = 24
    x = (rng.standard_normal((5, D)) * scale).astype(np.float32)
    dy = rng.standard_normal((5, D)).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    dx, dw = ab.rmsnorm_backward(dy, x, w, backend=backend)
    X, Y, W = (a.astype(np.float64) for a in (x, dy, w))
    r = 1.0 / np.sqrt((X * X).mean(axis=1, keepdims=True) + 1e-5)
    want = W * Y * r - X * r**3 / D * (W * Y * X).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(dw, (Y * X * r).sum(axis=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("g", [1e3, 3e19, -1e20])
def test_adamw_updates_for_huge_gradients(backend, g):
    """At step 1 the reference formed v/(1 - beta2), which overflowed for
    |g| > ~2e19 and gave no update. The first Adam step is -lr * sign(g)."""
    p = np.ones(6, np.float32)
    grad = np.full(6, g, np.float32)
    m, v = np.zeros(6, np.float32), np.zeros(6, np.float32)
    ab.adamw_step(p, grad, m, v, step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                  backend=backend)
    np.testing.assert_allclose(p, 1.0 - 0.1 * np.sign(g), rtol=1e-6)


def test_reference_rope_bounds_the_position_before_adding():
    x = np.ones((3, 8), np.float32)
    for fn in (ab.rope, ab.rope_backward):
        with pytest.raises(ValueError):
            fn(x, head_dim=4, pos_offset=2**63 - 1, backend="reference")
        with pytest.raises(ValueError):
            fn(x, head_dim=4, pos_offset=2**63 - 3, backend="reference")
        y = fn(x, head_dim=4, pos_offset=2**63 - 4, backend="reference")   # the last position fits
        assert np.isfinite(y).all()


def test_reference_sizes_are_bounded_before_they_are_multiplied():
    """Sizes whose product overflows int64 are an error code, not a wrapped
    index (the old loops ran with them and wrote out of bounds). Run in a
    child process, so that the old behaviour fails the test instead of
    crashing the test run."""
    script = textwrap.dedent("""
        from anebackward._native import ffi, lib
        f = ffi.new("float[64]")
        d = ffi.new("double *")
        t = ffi.new("int32_t[64]")
        big = 2**62
        rcs = [
            lib.ab_ref_linear_forward(f, f, f, big, 4, 4),
            lib.ab_ref_linear_backward_dx(f, f, f, 4, big, 4, 0),
            lib.ab_ref_linear_backward_dW(f, f, f, 4, 4, big, 1),
            lib.ab_ref_rmsnorm_forward(f, f, f, big, 8, 1e-5),
            lib.ab_ref_rmsnorm_backward(f, f, f, f, f, big, 8, 1e-5, 0),
            lib.ab_ref_rope_forward(f, f, 1, big, 2, 2, 0),
            lib.ab_ref_rope_backward(f, f, big, 2, 2, 2, 0),
            lib.ab_ref_attention_forward(f, f, f, f, 1, big, 2, 2, 2, f, 64),
            lib.ab_ref_attention_backward(f, f, f, f, f, f, f, 1, big, 2, 2, 2, f, 64),
            lib.ab_ref_cross_entropy(d, ffi.NULL, f, f, t, big, 4, 1.0),
            lib.ab_ref_embedding_forward(f, f, t, 4, big, 4),
            lib.ab_ref_embedding_backward(f, f, t, big, 4, 4),
        ]
        print(rcs)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rcs = eval(res.stdout)
    assert all(rc in (-4, -5) for rc in rcs), rcs      # AB_EWORKSPACE / AB_ETOOBIG
