"""Weight staging keyed to the parameter buffer's version, the asynchronous
dx dispatch overlapped with the CPU's dW, the "auto" envelope, and the
compiler's working directories — all under the emulated platform, against
float64 oracles."""
import os
import pathlib
import subprocess
import warnings
import sys

import numpy as np
import pytest

import anebackward as ab
from anebackward import ane
from anebackward._native import ffi, lib


def rel_err(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def flat_model(rng, n_out, n_in):
    """Parameters in one flat buffer, W a view into it (as in anebackward.Llama)."""
    flat = (rng.standard_normal(n_out * n_in + 37) * 0.05).astype(np.float32)
    return flat, flat[:n_out * n_in].reshape(n_out, n_in)


def test_staged_weights_are_reused_until_the_version_changes(emulator, rng):
    n_out, n_in, N = 96, 80, 64
    flat, W = flat_model(rng, n_out, n_in)
    m, v = np.zeros_like(flat), np.zeros_like(flat)
    version = 1
    dy = rng.standard_normal((N, n_out)).astype(np.float32)

    ane.linear_backward_dx(dy, W, w_version=version)
    assert ane.last_call()["w_staged"] is True and ane.status()["weight_stagings"] == 1
    for _ in range(3):                                    # same step: the fp16 copy is reused
        dy = rng.standard_normal((N, n_out)).astype(np.float32)
        got = ane.linear_backward_dx(dy, W, w_version=version)
        assert ane.last_call()["w_staged"] is False
        assert rel_err(got, dy.astype(np.float64) @ W.astype(np.float64)) < 1e-3
    st = ane.status()
    assert st["weight_stagings"] == 1 and st["weight_reuses"] == 3

    W_before = W.astype(np.float64)
    grad = rng.standard_normal(flat.shape).astype(np.float32)
    ab.adamw_step(flat, grad, m, v, step=1, lr=0.01)      # the optimiser step changes the buffer
    version += 1
    got = ane.linear_backward_dx(dy, W, w_version=version)
    assert ane.last_call()["w_staged"] is True and ane.status()["weight_stagings"] == 2
    assert rel_err(got, dy.astype(np.float64) @ W.astype(np.float64)) < 1e-3
    assert rel_err(got, dy.astype(np.float64) @ W_before) > 1e-2, "the step's change shows in dx"


def test_the_version_is_the_key(emulator, rng):
    """A change of W without a new version is not seen (the documented
    contract); version 0 converts W on every call."""
    flat, W = flat_model(rng, 64, 64)
    dy = rng.standard_normal((64, 64)).astype(np.float32)
    old = W.astype(np.float64)
    ane.linear_backward_dx(dy, W, w_version=5)
    W *= np.float32(2.0)
    stale = ane.linear_backward_dx(dy, W, w_version=5)
    assert rel_err(stale, dy @ old) < 1e-3
    fresh = ane.linear_backward_dx(dy, W, w_version=0)
    assert ane.last_call()["w_staged"] is True and rel_err(fresh, dy @ W.astype(np.float64)) < 1e-3
    again = ane.linear_backward_dx(dy, W, w_version=0)
    assert ane.last_call()["w_staged"] is True and np.array_equal(again, fresh)


def test_each_weight_has_its_own_staging(emulator, rng):
    """Layers of one shape share a program, not their staged weights."""
    Ws = [flat_model(np.random.default_rng(i), 64, 96)[1] for i in range(3)]
    dy = rng.standard_normal((64, 64)).astype(np.float32)
    for _ in range(2):
        for W in Ws:
            got = ane.linear_backward_dx(dy, W, w_version=1)
            assert rel_err(got, dy.astype(np.float64) @ W.astype(np.float64)) < 1e-3
    st = ane.status()
    assert st["compiles"] == 1 and st["weight_stagings"] == 3 and st["weight_reuses"] == 3


def test_staged_weights_out_of_fp16_range_stay_on_the_cpu(emulator, rng):
    flat, W = flat_model(rng, 64, 64)
    W[0, 0] = 1e6
    dy = rng.standard_normal((64, 64)).astype(np.float32)
    got = ane.linear_backward_dx(dy, W, w_version=1)
    assert ane.last_call()["fallback"].startswith("input outside fp16 range")
    W[0, 0] = 0.01                                       # fixed, and the version bumped
    got = ane.linear_backward_dx(dy, W, w_version=2)
    assert ane.last_call()["fallback"] is None and rel_err(got, dy @ W.astype(np.float64)) < 1e-3


def test_clear_cache_drops_staged_weights(emulator, rng):
    flat, W = flat_model(rng, 64, 64)
    dy = rng.standard_normal((64, 64)).astype(np.float32)
    ane.linear_backward_dx(dy, W, w_version=1)
    ane.clear_cache()
    ane.linear_backward_dx(dy, W, w_version=1)
    assert ane.last_call()["w_staged"] is True


# ------------------------------------------------------------------ async

def test_async_dx_matches_and_reports(emulator, rng):
    flat, W = flat_model(rng, 96, 80)
    dy = rng.standard_normal((3, 50, 96)).astype(np.float32)
    out = np.ones((3, 50, 80), np.float32)
    job = ane.linear_backward_dx_async(dy, W, dx=out, accumulate=True, w_version=3)
    got = job.wait()
    assert got is out and job.done()
    assert rel_err(got, 1.0 + dy.astype(np.float64) @ W.astype(np.float64)) < 1e-3
    assert job.info["t_end_ns"] >= job.info["t_start_ns"] > 0 and job.info["fallback"] is None
    assert job.wait() is out, "waiting twice is harmless"


def test_several_jobs_in_flight_run_in_order(emulator, rng):
    Ws = [flat_model(np.random.default_rng(i), 64, 64)[1] for i in range(4)]
    dys = [rng.standard_normal((128, 64)).astype(np.float32) for _ in Ws]
    jobs = [ane.linear_backward_dx_async(dy, W, w_version=1) for dy, W in zip(dys, Ws)]
    outs = [j.wait() for j in jobs]
    for dy, W, got in zip(dys, Ws, outs):
        assert rel_err(got, dy.astype(np.float64) @ W.astype(np.float64)) < 1e-3
    starts = [j.info["t_start_ns"] for j in jobs]
    assert starts == sorted(starts), "one worker, first in first out"


def test_async_errors_arrive_at_wait(emulator, rng):
    from anebackward.errors import AnebackwardError
    lib.ab_ane_emulated_fail_next(b"evaluate", 1, 0)
    try:
        flat, W = flat_model(rng, 64, 64)
        dy = rng.standard_normal((64, 64)).astype(np.float32)
        job = ane.linear_backward_dx_async(dy, W)
        with pytest.raises(AnebackwardError, match="injected evaluate failure"):
            job.wait()
        assert rel_err(job._out, dy @ W.astype(np.float64)) < 1e-6, "the CPU finished the rows"
    finally:
        lib.ab_ane_emulated_fail_next(ffi.NULL, 0, 0)


def test_async_without_an_ane(monkeypatch, rng):
    monkeypatch.setenv("ANEBACKWARD_ANE", "off")
    ane.reset()
    prev = ane.use_emulator(None)
    try:
        flat, W = flat_model(rng, 64, 64)
        dy = rng.standard_normal((8, 64)).astype(np.float32)
        job = ane.linear_backward_dx_async(dy, W, backend="auto")
        assert job.done() and rel_err(job.wait(), dy @ W.astype(np.float64)) < 1e-6
        with pytest.raises(ab.AneUnavailableError):
            ane.linear_backward_dx_async(dy, W, backend="ane")
    finally:
        ane.use_emulator(prev)
        ane.reset()


@pytest.fixture
def handshake():
    """Job timing that does not depend on the scheduler (ab_testing.h): a
    job submitted to the idle worker has started when submit returns, and
    runs until it is waited for."""
    lib.ab_ane_testing_handshake(1)
    yield
    lib.ab_ane_testing_handshake(0)


def test_linear_backward_overlaps_dx_on_the_ane_with_dW_on_the_cpu(emulator, handshake, rng):
    """dx runs as a job on the context's worker thread from before the
    calling thread starts dW until after dW ends: the intervals intersect.
    The handshake makes this independent of machine load, and still fails
    when dx runs on the caller's thread, or is waited for before dW starts
    or submitted after it ends."""
    N, n_in, n_out = 256, 768, 768
    flat, W = flat_model(rng, n_out, n_in)
    x = rng.standard_normal((N, n_in)).astype(np.float32)
    dy = rng.standard_normal((N, n_out)).astype(np.float32)
    dx, dW = ane.linear_backward(dy, x, W, w_version=1)
    assert rel_err(dx, dy.astype(np.float64) @ W.astype(np.float64)) < 1e-3
    assert rel_err(dW, dy.astype(np.float64).T @ x.astype(np.float64)) < 1e-5
    info = ane.last_call()
    a0, a1, c0, c1 = info["t_start_ns"], info["t_end_ns"], info["dW_start_ns"], info["dW_end_ns"]
    assert a0 < c1 and c0 < a1, f"dx on the ANE [{a0}, {a1}] and dW on the CPU [{c0}, {c1}] overlap"
    assert a0 < c0 and c1 < a1, "dx is in flight for the whole dW"
    n = ffi.new("int64_t *")
    lib.ab_ane_testing_job_log(ffi.NULL, 0, n)
    assert n[0] == 1                               # one job: dx went through the worker
    # the synchronous call, for contrast, cannot overlap anything
    t0 = ane.clock_ns()
    ane.linear_backward_dx(dy, W, w_version=1)
    assert ane.last_call()["t_start_ns"] >= t0


def test_linear_backward_arguments(emulator, rng):
    flat, W = flat_model(rng, 64, 32)
    dy = rng.standard_normal((8, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="x must be"):
        ane.linear_backward(dy, np.zeros((8, 31), np.float32), W)
    with pytest.raises(TypeError, match="x must have dtype float32"):
        ane.linear_backward(dy, np.zeros((8, 32), np.float64), W)
    dx, dW = np.zeros((8, 32), np.float32), np.ones((64, 32), np.float32)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    gx, gW = ane.linear_backward(dy, x, W, dx=dx, dW=dW, accumulate_dW=True)
    assert gx is dx and gW is dW
    assert rel_err(dW, 1.0 + dy.astype(np.float64).T @ x) < 1e-5


# --------------------------------------------------------------- envelope

@pytest.mark.parametrize("N,n_in,n_out,inside", [
    (256, 768, 768, True),          # Stories110M projections
    (256, 2048, 768, True),
    (256, 768, 2048, True),
    (256, 3072, 1024, True),        # Qwen3-0.6B w2
    (256, 1024, 3072, True),        # Qwen3-0.6B w1/w3
    (256, 4096, 4096, False),
    (256, 768, 32000, False),       # a classifier
    (256, 16384, 1024, False),
])
def test_auto_keeps_to_the_origins_envelope(emulator, N, n_in, n_out, inside):
    reason = ane.route_reason("auto", "linear_backward_dx", N=N, n_in=n_in, n_out=n_out)
    assert (reason is None) == inside, reason
    if not inside:
        assert "outside the shapes the origin project ran" in reason
    assert ane.routes("ane", "linear_backward_dx", N=N, n_in=n_in, n_out=n_out), "'ane' is the user's call"


def test_auto_calls_kept_on_the_cpu_say_why(emulator, rng):
    dy = rng.standard_normal((256, 64)).astype(np.float32)
    W = (rng.standard_normal((64, 4096)) * 0.02).astype(np.float32)     # in = 4096: outside
    got = ab.linear_backward_dx(dy, W, backend="auto")
    assert ane.last_call()["fallback"].startswith("not routed: in=4096, out=64")
    assert rel_err(got, dy.astype(np.float64) @ W.astype(np.float64)) < 1e-6
    assert ane.status()["calls"] == 0


# ------------------------------------------------------- working directories

def test_work_dirs_are_unique_per_context_and_removed(emulator, rng, tmp_path):
    """Two contexts compiling the same shape get different directories (the
    per-context tag changes the program's identity), each removes its own."""
    assert lib.ab_ane_emulated_workdir(str(tmp_path).encode()) == 0
    flat, W = flat_model(rng, 64, 64)
    dy = rng.standard_normal((64, 64)).astype(np.float32)

    def program_dir(ctx):
        buf = ffi.new("char[]", 1200)
        lib.ab_ane_testing_program_dir(ctx, 64, 64, 64, buf, 1200)
        return ffi.string(buf).decode()

    ane.linear_backward_dx(dy, W)
    ctx_a = ane._current()[0]
    dir_a = program_dir(ctx_a)
    assert dir_a and pathlib.Path(dir_a, "model.mil").is_file()
    ane._contexts.clear()                                 # a second context, the first still alive
    ane.linear_backward_dx(dy, W)
    ctx_b = ane._current()[0]
    dir_b = program_dir(ctx_b)
    assert dir_b and dir_b != dir_a and os.path.isdir(dir_a)
    assert pathlib.Path(dir_a, "model.mil").read_text() != pathlib.Path(dir_b, "model.mil").read_text()
    del ctx_b
    ane.reset()
    import gc
    gc.collect()
    assert os.path.isdir(dir_a), "closing one context leaves the other's directory alone"
    del ctx_a
    gc.collect()
    assert sorted(os.listdir(tmp_path)) == []


def test_a_directory_found_in_place_is_not_removed(emulator, rng, tmp_path):
    """A program whose directory already exists (another process compiling
    the same text) uses it but never deletes it."""
    lib.ab_ane_emulated_workdir(str(tmp_path).encode())
    mil = ane.mil_linear_dx(64, 64, 64)
    x = np.zeros((1, 64, 1, 128), np.float16)
    ane.run_mil(mil, x, (1, 64, 1, 64))
    assert os.listdir(tmp_path) == [], "run_mil's own directory is removed after the run"
    code = ("import anebackward.ane as a, numpy as np, time, sys; from anebackward._native import lib; "
            f"a.use_emulator(True); lib.ab_ane_emulated_workdir({str(tmp_path)!r}.encode()); "
            "a.linear_backward_dx(np.ones((64, 64), np.float32), np.full((64, 64), .1, np.float32)); "
            "print('ready', flush=True); sys.stdin.readline()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        other = os.listdir(tmp_path)
        assert len(other) == 1, "the other process's program directory"
        ane.run_mil(open(os.path.join(tmp_path, other[0], "model.mil")).read(), x, (1, 64, 1, 64))
        assert os.listdir(tmp_path) == other, "the same text found the directory and left it"
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        p.wait(timeout=60)
    assert os.listdir(tmp_path) == [], "its creator removed it"


def test_close_waits_for_queued_jobs(rng):
    """ab_ane_close drains the worker's queue: a job submitted just before
    still completes, and its wait() works after the context is gone."""
    p = ffi.new("ab_ane_ctx **")
    err = ffi.new("char[]", 256)
    assert lib.ab_ane_open(p, b"emulated", err, 256) == 0
    ctx = p[0]
    dy = rng.standard_normal((256, 192)).astype(np.float32)
    W = (rng.standard_normal((192, 128)) * 0.05).astype(np.float32)
    dx = np.zeros((256, 128), np.float32)
    jp = ffi.new("ab_ane_job **")
    fp = lambda a: ffi.cast("float *", ffi.from_buffer(a))         # noqa: E731
    assert lib.ab_ane_linear_backward_dx_submit(ctx, jp, fp(dx), fp(dy), fp(W), 1, 256, 128, 192, 0, 0) == 0
    assert lib.ab_ane_close(ctx) == 0
    info = ffi.new("ab_ane_call_info *")
    assert lib.ab_ane_job_wait(jp[0], info, err, 256) == 0
    assert info.tiles == 1 and info.tiles_cpu == 0
    assert rel_err(dx, dy.astype(np.float64) @ W.astype(np.float64)) < 1e-3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_async_after_fork_starts_a_worker_in_the_child():
    """A child forked after the parent used the async path (e.g. a
    fork-started DDP worker) has the context but not its worker thread: its
    jobs must still run (they hung on the parent's absent worker)."""
    code = r'''
import os, sys, numpy as np, anebackward.ane as a
a.use_emulator(True)
W = np.full((64, 64), 0.1, np.float32); dy = np.ones((64, 64), np.float32)
a.linear_backward_dx_async(dy, W).wait()
pid = os.fork()
if pid == 0:
    import signal; signal.alarm(60)     # a hang ends the child instead of outliving the test
    got = a.linear_backward_dx_async(dy, W).wait()
    os._exit(0 if abs(float(got[0, 0]) - 6.4) < 0.01 else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
'''
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------- output names

@pytest.mark.parametrize("name", ["linear_backward_dx", "linear_backward_dx_async"])
def test_the_ane_dx_functions_name_their_output_dx(emulator, rng, name):
    """The package's convention (docs/kernels.md): a backward output is named
    after its gradient, dx=, and has no other name."""
    fn = getattr(ane, name)
    get = (lambda r: r.wait()) if name.endswith("_async") else (lambda r: r)
    flat, W = flat_model(rng, 64, 48)
    dy = rng.standard_normal((64, 64)).astype(np.float32)
    ref = dy.astype(np.float64) @ W.astype(np.float64)
    buf = np.full((64, 48), 2.0, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get(fn(dy, W, dx=buf)) is buf
    assert rel_err(buf, ref) < 1e-3
    old = np.ones((64, 48), np.float32)
    assert get(fn(dy, W, dx=old, accumulate=True)) is old
    assert rel_err(old, 1.0 + ref) < 1e-3
    with pytest.raises(TypeError, match="out"):
        fn(dy, W, out=old)
    with pytest.raises(ValueError, match="pass dx="):
        fn(dy, W, accumulate=True)
    with pytest.raises(ValueError, match="dx must"):
        fn(dy, W, dx=np.zeros((64, 47), np.float32))
