"""The worker pool (csrc/threads.c): every kernel and a whole training step
give bit-identical results at 1, 2, 3 and 4 threads (fixed chunking, fixed
reduction order), match the reference loops, stay exact when four Python
threads call them at once, and the one thread setting is honoured."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import anebackward as ab
from anebackward import AdamW, Llama, LlamaConfig
from anebackward._native import ffi, lib

pytestmark = pytest.mark.usefixtures("keep_blas_threads")
COUNTS = (1, 2, 3, 4)


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s, dtype=np.float32)  # noqa: E731
    n = 9 * 16384 + 7                     # several chunks of AB_CHUNK, a ragged tail
    # every size above the pool's minimum work (128 Ki floats), several tasks each
    d = dict(x=f(500, 300), w=f(300), dy=f(500, 300),                      # rmsnorm: 39 row tasks
             rq=f(2, 300, 256), h1=f(5 * 16384 + 5), h3=f(5 * 16384 + 5), g=f(5 * 16384 + 5),
             q=f(2, 130, 64), k=f(2, 130, 32), v=f(2, 130, 32), do=f(2, 130, 64),
             logits=f(200, 1000), targets=r.integers(0, 1000, 200).astype(np.int32),
             tok=r.integers(0, 50, 600).astype(np.int32), E=f(50, 256), dx=f(600, 256),
             p=f(n), pg=f(n), pm=np.abs(f(n)), pv=np.abs(f(n)), W=f(500, 300), dy2=f(500, 500))
    d["targets"][::7] = -1
    return d


def _run_all(d, backend=None):
    """Every kernel on the inputs; a list of (name, result array)."""
    b = dict(backend=backend)
    out = [("linear", ab.linear(d["x"], d["W"], **b)),
           ("linear_backward_dx", ab.linear_backward_dx(d["dy2"], d["W"], **b)),
           ("linear_backward_dW", ab.linear_backward_dW(d["dy2"], d["x"], **b))]
    out += [("rmsnorm", ab.rmsnorm(d["x"], d["w"], **b))]
    dx, dw = ab.rmsnorm_backward(d["dy"], d["x"], d["w"], dw=np.ones(300, np.float32), **b)
    out += [("rmsnorm_backward dx", dx), ("rmsnorm_backward dw", dw)]
    out += [("rope", ab.rope(d["rq"], head_dim=64, pos_offset=3, **b)),
            ("rope_backward", ab.rope_backward(d["rq"], head_dim=64, **b)),
            ("swiglu", ab.swiglu(d["h1"], d["h3"], **b))]
    d1, d3 = ab.swiglu_backward(d["g"], d["h1"], d["h3"], **b)
    out += [("swiglu_backward dh1", d1), ("swiglu_backward dh3", d3)]
    out += [("attention", ab.attention(d["q"], d["k"], d["v"], n_heads=4, n_kv_heads=2, **b))]
    for name, a in zip(("dq", "dk", "dv"), ab.attention_backward(
            d["do"], d["q"], d["k"], d["v"], n_heads=4, n_kv_heads=2, **b)):
        out.append(("attention_backward " + name, a))
    loss, dl = ab.cross_entropy_backward(d["logits"], d["targets"], **b)
    out += [("cross_entropy loss", np.float64(loss)), ("cross_entropy dlogits", dl)]
    out += [("embedding", ab.embedding(d["tok"], d["E"], **b)),
            ("embedding_backward", ab.embedding_backward(d["dx"], d["tok"], dE=d["E"].copy(), **b))]
    out += [("grad_norm", np.float64(ab.grad_norm([d["p"]], **b)))]
    p, m, v = d["p"].copy(), d["pm"].copy(), d["pv"].copy()
    ab.adamw_step(p, d["pg"], m, v, step=3, lr=1e-2, weight_decay=0.1, **b)
    out += [("adamw p", p), ("adamw m", m), ("adamw v", v)]
    s = d["p"].copy()
    ab.clip_grad_norm([s], 1.0, **b)
    out += [("clip_grad_norm", s)]
    return out


def test_every_kernel_is_bit_identical_at_1_2_3_4_threads_and_matches_the_reference():
    d = _inputs()
    results = {}
    for n in COUNTS:
        ab.set_num_threads(n)
        assert ab.get_num_threads() == n
        results[n] = _run_all(d)
    for n in COUNTS[1:]:
        for (name, a), (_, b) in zip(results[1], results[n]):
            np.testing.assert_array_equal(b, a, err_msg=f"{name} at {n} threads vs 1")
    ref = _run_all(d, backend="reference")
    for (name, a), (_, r) in zip(results[4], ref):
        np.testing.assert_allclose(a, r, rtol=2e-4, atol=2e-4, err_msg=name)


def _train_steps(n_threads):
    ab.set_num_threads(n_threads)
    cfg = LlamaConfig(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                      max_seq_len=96, shared_classifier=False)
    model = Llama(cfg, seed=1)
    opt = AdamW(model, lr=1e-2)
    tokens = np.random.default_rng(2).integers(0, 300, (2, 97)).astype(np.int32)
    losses = []
    for _ in range(2):
        losses.append(model.forward(tokens[:, :-1], tokens[:, 1:]))
        model.backward()
        model.clip_grad_norm(1.0)
        opt.step()
    return losses, model.flat_grads.copy(), model.flat_params.copy()


def test_those_inputs_run_every_kernel_through_the_pool():
    """Each kernel call of the test above opens at least one parallel region
    (so the bit-identity check covers the threaded path)."""
    d = _inputs()
    ab.set_num_threads(2)
    regions = ffi.new("int64_t*")
    seen = []
    real = {}
    for name in ("linear", "linear_backward_dx", "linear_backward_dW", "rmsnorm",
                 "rmsnorm_backward", "rope", "rope_backward", "swiglu", "swiglu_backward",
                 "attention", "attention_backward", "cross_entropy_backward", "embedding",
                 "embedding_backward", "grad_norm", "adamw_step", "clip_grad_norm"):
        real[name] = getattr(ab, name)

        def counted(*a, _f=real[name], _n=name, **k):
            lib.ab_pool_stats(1, ffi.NULL, ffi.NULL, ffi.NULL)
            r = _f(*a, **k)
            lib.ab_pool_stats(0, ffi.NULL, regions, ffi.NULL)
            seen.append((_n, regions[0]))
            return r
        setattr(ab, name, counted)
    try:
        _run_all(d)
    finally:
        for name, f in real.items():
            setattr(ab, name, f)
    assert len(seen) >= len(real)
    assert all(n >= 1 for _, n in seen), [name for name, n in seen if n < 1]


def test_a_whole_training_step_is_bit_identical_at_1_2_3_4_threads():
    base = _train_steps(1)
    for n in COUNTS[1:]:
        losses, grads, params = _train_steps(n)
        assert losses == base[0], n
        np.testing.assert_array_equal(grads, base[1], err_msg=f"grads at {n} threads")
        np.testing.assert_array_equal(params, base[2], err_msg=f"params at {n} threads")


def test_four_python_threads_at_once_give_the_serial_results_exactly():
    ab.set_num_threads(2)                 # the pool is busy for some callers: they run inline
    inputs = [_inputs(s) for s in range(4)]
    serial = [_run_all(d) for d in inputs]
    results = [None] * 4

    def run(i):
        results[i] = [_run_all(inputs[i]) for _ in range(2)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(4):
        for rep in results[i]:
            for (name, a), (_, b) in zip(serial[i], rep):
                np.testing.assert_array_equal(b, a, err_msg=f"{name}, Python thread {i}")


def test_set_num_threads_checks_its_argument():
    for bad in (0, -1, 257, 2.0, True, "2"):
        with pytest.raises(ValueError, match="set_num_threads"):
            ab.set_num_threads(bad)
    assert lib.ab_set_num_threads(0) == lib.AB_EINVAL
    ab.set_num_threads(3)
    assert ab.get_num_threads() == 3
    # OpenBLAS stays single-threaded: the pool runs the sgemm tiles (0: Accelerate decides)
    assert ab.blas_info()["threads"] in (0, 1)


def _child(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True)


def test_the_environment_variable_sets_the_default():
    r = _child("import anebackward as a; print(a.get_num_threads(), a.blas_info()['threads'])",
               ANEBACKWARD_NUM_THREADS="3")
    assert r.returncode == 0, r.stderr
    n, blas = r.stdout.split()
    assert n == "3" and blas in ("0", "1")
    r = _child("import anebackward", ANEBACKWARD_NUM_THREADS="zero")
    assert r.returncode != 0 and "ANEBACKWARD_NUM_THREADS" in r.stderr


def test_the_pool_survives_fork():
    """A forked child (multiprocessing's default on Linux) has no pool
    threads; its first parallel kernel must start new ones, not hang."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    r = _child("import os, numpy as np, anebackward as a\n"
               "a.set_num_threads(2); x = np.ones(100000, np.float32); a.swiglu(x, x)\n"
               "pid = os.fork()\n"
               "if pid == 0:\n"
               "    y = a.swiglu(x, x); os._exit(0 if y[0] > 0 else 1)\n"
               "_, st = os.waitpid(pid, 0); print(os.waitstatus_to_exitcode(st))\n")
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stdout + r.stderr


# ---- masked entries contribute exactly nothing ----

def test_an_inf_in_a_masked_value_row_leaves_earlier_rows_alone():
    q = np.ones((4, 2), np.float32)
    v = q.copy()
    v[3] = np.inf
    out = ab.attention(q, q, v, n_heads=1)
    np.testing.assert_array_equal(out[:, 0], [1, 1, 1, np.inf])


@pytest.mark.parametrize("threads", [1, 2])
def test_inf_partners_in_a_masked_block_match_the_reference(threads):
    ab.set_num_threads(threads)
    r = np.random.default_rng(5)
    B, S, H, KV, hd = 2, 70, 4, 2, 8
    q = r.standard_normal((B, S, H * hd), dtype=np.float32)
    k = r.standard_normal((B, S, KV * hd), dtype=np.float32)
    v = r.standard_normal((B, S, KV * hd), dtype=np.float32)
    do = r.standard_normal((B, S, H * hd), dtype=np.float32)
    v[0, 66, 3] = np.inf                  # second block: rows 64, 65 must stay finite
    k[1, 40, 0] = np.inf                  # first block of batch 1, backward
    for a, b in zip([ab.attention(q, k, v, n_heads=H, n_kv_heads=KV)],
                    [ab.attention(q, k, v, n_heads=H, n_kv_heads=KV, backend="reference")]):
        assert np.isfinite(a[0, :66]).all()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    got = ab.attention_backward(do, q, k, v, n_heads=H, n_kv_heads=KV)
    ref = ab.attention_backward(do, q, k, v, n_heads=H, n_kv_heads=KV, backend="reference")
    assert np.isfinite(got[0][1, :40]).all()      # dq rows before the inf key
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ---- sizes are bounded before they are multiplied ----

def test_rope_refuses_a_position_that_would_overflow():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="pos_offset"):
        ab.rope(x, head_dim=4, pos_offset=2**63 - 1)
    buf = ffi.new("float[8]")
    assert lib.ab_rope_forward(buf, buf, 1, 2, 1, 4, 2**63 - 1) == lib.AB_EINVAL
    assert lib.ab_rope_forward(buf, buf, 1, 2, 2**62, 4, 0) == lib.AB_ETOOBIG
    np.testing.assert_array_equal(ab.rope(x, head_dim=4, pos_offset=2**63 - 3),
                                  ab.rope(x, head_dim=4, pos_offset=2**63 - 3, backend="reference"))


def test_attention_workspace_refuses_bad_lengths():
    for bad in (-5, 2**32):
        with pytest.raises(ValueError, match="S"):
            ab.attention_workspace(bad)
        assert lib.ab_attention_workspace_floats(bad) < 0
    assert ab.attention_workspace(0).size >= 1
    buf = ffi.new("float[64]")
    # H * hd would overflow int64: refused, not wrapped
    assert lib.ab_attention_forward(buf, buf, buf, buf, 1, 2, 2**62, 2**62, 4, buf, 64) == \
        lib.AB_ETOOBIG
