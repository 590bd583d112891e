"""The C core says why it refused: ab_last_error() holds this thread's
message ("function: reason"), and Python's exceptions carry it."""
import threading

import numpy as np
import pytest

import anebackward as ab
from anebackward.errors import AnebackwardError
from anebackward._native import check, clear_error, ffi, fptr, last_error, lib


def test_guard_records_function_and_condition():
    clear_error()
    assert last_error() == ""
    rc = lib.ab_rmsnorm_forward(ffi.NULL, ffi.NULL, ffi.NULL, 2, 4, 1e-5)
    assert rc == lib.AB_ENULL
    assert last_error() == "ab_rmsnorm_forward: y is NULL"
    x = np.ones(8, dtype=np.float32)
    rc = lib.ab_rmsnorm_forward(fptr(x), fptr(x), fptr(x), -1, 4, 1e-5)
    assert rc == lib.AB_EINVAL
    assert last_error().startswith("ab_rmsnorm_forward: ")
    assert last_error().endswith(": N is negative (-1)")


def test_check_raises_the_c_message_and_clears_it():
    clear_error()
    rc = lib.ab_linear_forward(ffi.NULL, ffi.NULL, ffi.NULL, 1, 1, 1)
    assert rc == lib.AB_ENULL
    with pytest.raises(AnebackwardError, match=r"my call: linear_forward: y is NULL \(a required buffer is NULL\) "
                             r"\(C error -2\)"):
        check(rc, "my call")
    assert last_error() == ""


def test_each_thread_reads_its_own_error():
    """Two threads fail differently, interleaved by barriers: each reads its
    own message, not the other's (the record is thread-local)."""
    x = np.ones(8, dtype=np.float32)
    both_failed, read = threading.Barrier(2), {}
    clear_error()

    def null_y():
        clear_error()
        lib.ab_rmsnorm_forward(ffi.NULL, fptr(x), fptr(x), 2, 4, 1e-5)
        both_failed.wait()
        read["a"] = last_error()

    def negative_n():
        clear_error()
        lib.ab_linear_forward(fptr(x), fptr(x), fptr(x), -3, 2, 2)
        both_failed.wait()
        read["b"] = last_error()

    threads = [threading.Thread(target=null_y), threading.Thread(target=negative_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert read["a"] == "ab_rmsnorm_forward: y is NULL"
    assert read["b"].endswith(": N is negative (-3)")    # from the shape check under ab_linear_forward
    assert last_error() == ""      # the main thread cleared its own and failed nothing


def test_second_backward_from_c_says_one_backward_per_forward():
    m = ab.Llama(ab.LlamaConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, vocab_size=11,
                                max_seq_len=8), seed=0)
    tokens = np.arange(8, dtype=np.int32).reshape(1, 8) % 11
    m.forward(tokens)
    m.backward()
    B, S, work, _ = m._ws
    args = (m._cfg, fptr(m.flat_params), fptr(m.flat_grads), B, S, 1.0, 0, fptr(work), work.size)
    rc = lib.ab_model_backward(*args)
    assert rc == lib.AB_EINVAL
    assert "one backward per forward" in last_error()
    with pytest.raises(ValueError, match="one backward per forward"):
        check(rc, "ab_model_backward")


def test_ane_refusals_are_recorded_too():
    """The ANE's messages (its err buffers) reach ab_last_error() as well."""
    clear_error()
    ctx = ffi.new("ab_ane_ctx **")
    rc = lib.ab_ane_open(ctx, b"nosuch", ffi.NULL, 0)
    assert rc != 0 and ctx[0] == ffi.NULL
    assert last_error().startswith("ANE: ") and "nosuch" in last_error()
