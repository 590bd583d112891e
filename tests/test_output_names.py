"""One output-argument convention, documented in one table (docs/kernels.md): forward
outputs are out=, backward outputs d<input>=; an output passed is
overwritten unless accumulate=True."""
import inspect
import pathlib
import re
import warnings

import numpy as np
import pytest

import anebackward as ab

KERNELS_DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "kernels.md"
IN_PLACE = {"clip_grad_norm", "adamw_step"}


def _table():
    """{kernel: [output names]} from the output table of docs/kernels.md."""
    text = KERNELS_DOC.read_text()
    head = text.index("| kernel | output arguments | `accumulate=` |")
    rows = {}
    for line in text[head:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        kernels, outs, acc = (c.strip() for c in line.strip("|").split("|"))
        names = re.findall(r"`(\w+)`", outs.split("(")[0]) if "in place" not in outs else []
        for k in re.findall(r"`(\w+)`", kernels):
            rows[k] = (names, acc.startswith("yes"))
    return rows


def test_table_covers_every_kernel_and_matches_the_signatures():
    rows = _table()
    kernels = [n for n in ab.__all__ if callable(getattr(ab, n)) and n in
               {"linear", "linear_backward_dx", "linear_backward_dW", "rmsnorm", "rmsnorm_backward",
                "rope", "rope_backward", "attention", "attention_backward", "swiglu",
                "swiglu_backward", "cross_entropy_backward", "embedding", "embedding_backward",
                "clip_grad_norm", "adamw_step"}]
    assert set(rows) == set(kernels)
    for k, (outs, acc) in rows.items():
        params = inspect.signature(getattr(ab, k)).parameters
        if k in IN_PLACE:
            continue
        documented = set(outs)
        # outputs: out and d<name> (dy and dout are the upstream gradients, inputs;
        # denominator is cross_entropy_backward's loss divisor, a number)
        in_signature = {p for p in params if p == "out" or re.fullmatch(r"d[A-Za-z0-9]+", p)} - \
            {"dy", "dout", "denominator"}
        if k == "embedding_backward":
            in_signature.discard("dx")    # an input (the upstream gradient)
        assert in_signature == documented, k
        assert ("accumulate" in params) == acc, k
        if "backward" in k:
            assert all(o.startswith("d") for o in outs), k
        else:
            assert outs == ["out"], k


def _rand(rng, *s):
    return rng.standard_normal(s).astype(np.float32)


@pytest.mark.parametrize("kernel,new", [("linear_backward_dx", "dx"), ("linear_backward_dW", "dW"),
                                        ("rope_backward", "dx")])
def test_backward_output_has_one_name(rng, kernel, new):
    dy, W, x = _rand(rng, 6, 4), _rand(rng, 4, 8), _rand(rng, 6, 8)
    args = {"linear_backward_dx": (dy, W), "linear_backward_dW": (dy, x),
            "rope_backward": (x,)}[kernel]
    kw = {"head_dim": 4} if kernel == "rope_backward" else {}
    fn = getattr(ab, kernel)
    want = fn(*args, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        buf = np.full_like(want, np.nan)
        assert fn(*args, **{new: buf}, **kw) is buf and np.array_equal(buf, want)
    assert "out" not in inspect.signature(fn).parameters
    with pytest.raises(TypeError, match="out"):
        fn(*args, out=buf, **kw)


def test_rmsnorm_backward_dw_follows_the_convention(rng):
    dy, x, w = _rand(rng, 5, 8), _rand(rng, 5, 8), _rand(rng, 8)
    dx0, dw0 = ab.rmsnorm_backward(dy, x, w)
    # overwritten: stale contents do not leak in
    dx, dw = np.full(8 * 5, np.nan, np.float32).reshape(5, 8), np.full(8, np.nan, np.float32)
    ab.rmsnorm_backward(dy, x, w, dx=dx, dw=dw, accumulate=False)
    assert np.array_equal(dx, dx0) and np.array_equal(dw, dw0)
    # accumulate=True adds to every array passed; one not passed is new
    dw = np.ones(8, np.float32)
    got_dx, got_dw = ab.rmsnorm_backward(dy, x, w, dw=dw, accumulate=True)
    assert got_dw is dw and np.allclose(dw, dw0 + 1) and np.array_equal(got_dx, dx0)
    # the default is to overwrite, for dw as for every other output
    dw = np.ones(8, np.float32)
    ab.rmsnorm_backward(dy, x, w, dw=dw)
    assert np.array_equal(dw, dw0)


def test_embedding_backward_overwrites_unless_accumulating(rng):
    E = _rand(rng, 9, 4)
    x, tok = _rand(rng, 3, 4), np.array([1, 1, 7])
    want = np.zeros_like(E)
    np.add.at(want, tok, x)
    dE = np.full_like(E, np.nan)
    assert ab.embedding_backward(x, tok, dE=dE, accumulate=False) is dE
    np.testing.assert_allclose(dE, want, rtol=1e-6)
    dE = np.ones_like(E)
    ab.embedding_backward(x, tok, dE=dE, accumulate=True)
    np.testing.assert_allclose(dE, want + 1, rtol=1e-6)
    dE = np.ones_like(E)
    ab.embedding_backward(x, tok, dE=dE)   # the default: overwritten
    np.testing.assert_allclose(dE, want, rtol=1e-6)
