"""embedding gather and scatter-add gradient."""
import numpy as np
import pytest

import anebackward as ab
from oracle import assert_close, f64


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16])
def test_gather_and_scatter_add_with_repeats(rng, backend, dtype):
    E = rng.standard_normal((11, 7), dtype=np.float32)
    tokens = np.array([[3, 3, 0, 10], [5, 3, 10, 1]], dtype=dtype)
    x = ab.embedding(tokens, E, backend=backend)
    assert np.array_equal(x, E[tokens.astype(np.int64)])
    dx = rng.standard_normal((2, 4, 7), dtype=np.float32)
    dE = np.ones_like(E)
    assert ab.embedding_backward(dx, tokens, dE=dE, backend=backend, accumulate=True) is dE
    expect = np.ones((11, 7))
    np.add.at(expect, tokens.astype(np.int64).ravel(), f64(dx).reshape(-1, 7))
    assert_close(dE, expect, what="dE")


def test_seed_defect_int_index_overflow():
    """The seed indexed with int: tokens[t]*d overflows once vocab*dim > 2^31.
    Here the row offset is int64. The table is 9 GB of *virtual* zero pages
    (calloc), of which only the touched rows become real memory."""
    V, D = 70_000, 32_768                  # V*D = 2.29e9 > 2^31
    try:
        E = np.zeros((V, D), np.float32)
    except MemoryError:
        pytest.skip("cannot reserve 9 GB of address space on this machine")
    tok = np.array([V - 1], np.int32)
    dx = np.full((1, D), 2.0, np.float32)
    ab.embedding_backward(dx, tok, dE=E, accumulate=True)
    assert E[V - 1, 0] == 2.0 and E[V - 1, -1] == 2.0
    assert ab.embedding(tok, E)[0, 123] == 2.0
