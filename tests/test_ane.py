"""ANE dispatch of linear_backward_dx: availability and errors where there is
no ANE, and the whole path (MIL, packing, fp16, loss scaling, cache,
fallbacks) under the emulated platform, against a float64 oracle."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import anebackward as ab
from anebackward import ane
from anebackward.errors import AneUnavailableError

not_mac = pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the native platform may exist")


@pytest.fixture
def emulator(monkeypatch):
    monkeypatch.delenv("ANEBACKWARD_ANE", raising=False)
    ane.reset()
    prev = ane.use_emulator(True)
    saved = ane.configure()
    yield ane
    ane.configure(**saved)
    ane.use_emulator(prev)
    ane.reset()


@pytest.fixture
def native(monkeypatch):
    """The platform as the environment would choose it, no emulator."""
    monkeypatch.delenv("ANEBACKWARD_ANE", raising=False)
    monkeypatch.delenv("ANEBACKWARD_BACKEND", raising=False)
    ane.reset()
    prev = ane.use_emulator(None)
    yield ane
    ane.use_emulator(prev)
    ane.reset()


def problem(rng, N, n_in, n_out, dy_scale=1.0, w_scale=0.02, lead=()):
    dy = (rng.standard_normal(lead + (N, n_out)) * dy_scale).astype(np.float32)
    W = (rng.standard_normal((n_out, n_in)) * w_scale).astype(np.float32)
    ref = dy.astype(np.float64) @ W.astype(np.float64)
    return dy, W, ref


def rel_err(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


# ---------------------------------------------------------------- no ANE here

@not_mac
def test_unavailable_off_apple_with_a_reason(native):
    assert ane.available() is False
    st = ane.status()
    assert st["available"] is False and st["platform"] is None
    assert "Apple Silicon" in st["reason"] and sys.platform in st["reason"]
    assert "emulate" in st["reason"], "the reason says how to get the emulator"


@not_mac
def test_backend_ane_raises_with_the_reason(native, rng):
    dy, W, _ = problem(rng, 4, 6, 5)
    with pytest.raises(AneUnavailableError, match="Apple Silicon"):
        ab.linear_backward_dx(dy, W, backend="ane")
    with pytest.raises(AneUnavailableError):
        ane.linear_backward_dx(dy, W)


def test_env_off_disables_everywhere(native, monkeypatch, rng):
    monkeypatch.setenv("ANEBACKWARD_ANE", "off")
    assert not ane.available()
    assert "disabled by ANEBACKWARD_ANE='off'" in ane.status()["reason"]
    dy, W, _ = problem(rng, 4, 6, 5)
    with pytest.raises(AneUnavailableError, match="disabled"):
        ab.linear_backward_dx(dy, W, backend="ane")


def test_env_typo_is_explained(native, monkeypatch):
    monkeypatch.setenv("ANEBACKWARD_ANE", "emulatr")
    assert not ane.available()
    assert "'emulatr' is not understood" in ane.status()["reason"]


def test_auto_without_ane_is_the_cpu(native, monkeypatch, rng):
    monkeypatch.setenv("ANEBACKWARD_ANE", "off")
    dy, W, _ = problem(rng, 300, 64, 96)
    got = ab.linear_backward_dx(dy, W, backend="auto")
    assert np.array_equal(got, ab.linear_backward_dx(dy, W, backend="cpu"))


def test_env_selects_the_emulator(native, monkeypatch):
    monkeypatch.setenv("ANEBACKWARD_ANE", "emulate")
    assert ane.available() and ane.status()["platform"] == "emulated"


def test_import_opens_nothing():
    code = ("import anebackward, anebackward.ane as a, sys; "
            "sys.exit(0 if not a._contexts else 1)")
    env = dict(os.environ, ANEBACKWARD_ANE="emulate")
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


# ------------------------------------------------------------ emulated ANE

@pytest.mark.parametrize("N,n_in,n_out", [(64, 288, 768), (64, 768, 288), (64, 768, 768), (37, 50, 30), (1, 8, 3)])
def test_emulated_dx_matches_fp32_within_fp16_tolerance(emulator, rng, N, n_in, n_out):
    dy, W, ref = problem(rng, N, n_in, n_out)
    got = ab.linear_backward_dx(dy, W, backend="ane")
    cpu = ab.linear_backward_dx(dy, W, backend="cpu")
    assert rel_err(cpu, ref) < 1e-6
    # fp16 carries 11 significant bits (2^-11 = 4.9e-4 relative)
    assert rel_err(got, ref) < 1e-3
    assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max()
    info = ane.last_call()
    assert info["tiles_cpu"] == 0 and info["fallback"] is None


def test_emulated_batch_axes_out_and_accumulate(emulator, rng):
    dy, W, ref = problem(rng, 16, 40, 24, lead=(3,))
    out = rng.standard_normal((3, 16, 40)).astype(np.float32)
    start = out.copy()
    got = ab.linear_backward_dx(dy, W, dx=out, accumulate=True, backend="ane")
    assert got is out
    assert ane.last_call()["tiles"] == 1 and ane.last_call()["tiles_cpu"] == 0
    assert np.abs(got - (start + ref)).max() <= 2e-3 * np.abs(ref).max() + 1e-6


def test_emulated_several_tiles(emulator, rng):
    ane.configure(tile_rows=64)
    dy, W, ref = problem(rng, 150, 32, 48)
    got = ab.linear_backward_dx(dy, W, backend="ane")
    assert ane.last_call()["tiles"] == 3
    assert rel_err(got, ref) < 1e-3


def test_program_cache_is_keyed_by_shape(emulator, rng):
    dy, W, _ = problem(rng, 64, 32, 48)
    ab.linear_backward_dx(dy, W, backend="ane")
    assert ane.status()["compiles"] == 1 and ane.status()["cache_size"] == 1
    dy2, W2, ref2 = problem(rng, 64, 32, 48)              # same shape, new weights: no compile
    got = ab.linear_backward_dx(dy2, W2, backend="ane")
    assert ane.status()["compiles"] == 1
    assert rel_err(got, ref2) < 1e-3, "weights are data, not baked into the program"
    ab.linear_backward_dx(dy[:40], W, backend="ane")      # 40 rows -> S=64 again
    assert ane.status()["compiles"] == 1
    ab.linear_backward_dx(dy[:20], W, backend="ane")      # 20 rows -> S=32: new program
    assert ane.status()["compiles"] == 2 and ane.status()["cache_size"] == 2


def test_small_gradients_survive_only_with_loss_scaling(emulator, rng):
    dy, W, ref = problem(rng, 64, 96, 256, dy_scale=1e-6)
    scaled = ab.linear_backward_dx(dy, W, backend="ane")
    k = ane.last_call()["scale_log2"]
    assert k > 15, "1e-6 gradients are scaled up by a large power of two"
    assert rel_err(scaled, ref) < 1e-3
    assert not np.any(scaled == 0)

    ane.configure(loss_scaling=False)
    raw = ab.linear_backward_dx(dy, W, backend="ane")
    assert ane.last_call()["scale_log2"] == 0
    assert rel_err(raw, ref) > 1e-2, "without scaling fp16 subnormals lose the gradient"
    assert np.any(raw == 0), "some gradients flush to zero"


def test_fp16_overflow_falls_back_to_the_cpu(emulator, rng):
    dy, W, _ = problem(rng, 64, 32, 128, w_scale=100.0)   # |dx| far above 65504 after scaling
    before = ane.status()["fallbacks"]["overflow"]
    got = ab.linear_backward_dx(dy, W, backend="ane")
    assert ane.last_call()["fallback"] == "fp16 overflow" and ane.last_call()["tiles_cpu"] == 1
    assert ane.status()["fallbacks"]["overflow"] == before + 1
    assert np.array_equal(got, ab.linear_backward_dx(dy, W, backend="cpu"))


def test_overflow_in_one_tile_keeps_accumulate_exact(emulator, rng):
    ane.configure(tile_rows=32, loss_scaling=False)
    dy, W, ref = problem(rng, 64, 24, 64, w_scale=1.0)
    dy[32:] *= 1e4                                         # second tile overflows fp16 unscaled
    ref = dy.astype(np.float64) @ W.astype(np.float64)
    out = rng.standard_normal((64, 24)).astype(np.float32)
    start = out.copy()
    ab.linear_backward_dx(dy, W, dx=out, accumulate=True, backend="ane")
    info = ane.last_call()
    assert info["tiles"] == 2 and info["tiles_cpu"] == 1 and info["fallback"] == "fp16 overflow"
    want = start + ref
    assert np.abs(out[:32] - want[:32]).max() <= 2e-3 * np.abs(ref[:32]).max() + 1e-6   # ANE tile
    cpu = start.copy()                                     # the CPU tile is the CPU kernel's result
    ab.linear_backward_dx(dy[32:], W, dx=cpu[32:], accumulate=True, backend="cpu")
    assert np.array_equal(out[32:], cpu[32:])


@pytest.mark.parametrize("what", ["dy_nan", "dy_inf", "W_big", "W_tiny"])
def test_inputs_outside_fp16_go_to_the_cpu(emulator, rng, what):
    dy, W, _ = problem(rng, 8, 16, 12)
    if what == "dy_nan":
        dy[3, 2] = np.nan
    elif what == "dy_inf":
        dy[0, 0] = np.inf
    elif what == "W_big":
        W[1, 1] = 1e5
    else:   # every weight would be an fp16 subnormal (they are not loss-scaled)
        W *= np.float32(1e-7)
    got = ab.linear_backward_dx(dy, W, backend="ane")
    assert ane.last_call()["fallback"].startswith("input outside fp16 range")
    np.testing.assert_array_equal(got, ab.linear_backward_dx(dy, W, backend="cpu"))


def test_compile_budget_sends_new_shapes_to_the_cpu(emulator, rng):
    ane.configure(max_programs=1)
    dy, W, _ = problem(rng, 32, 16, 8)
    ab.linear_backward_dx(dy, W, backend="ane")
    dy2, W2, ref2 = problem(rng, 32, 24, 8)
    got = ab.linear_backward_dx(dy2, W2, backend="ane")
    assert ane.last_call()["fallback"] == "compile budget spent"
    assert ane.status()["compiles"] == 1 and ane.status()["fallbacks"]["budget"] == 1
    assert rel_err(got, ref2) < 1e-6
    ab.linear_backward_dx(dy, W, backend="ane")            # the cached shape still runs there
    assert ane.last_call()["fallback"] is None


def test_auto_uses_the_ane_only_when_worth_it(emulator, rng):
    ane.configure(min_flops=10 ** 6)
    big = problem(rng, 64, 96, 96)                         # 1.2 MFLOP
    small = problem(rng, 8, 96, 96)                        # 0.15 MFLOP
    calls = ane.status()["calls"]
    got = ab.linear_backward_dx(big[0], big[1], backend="auto")
    assert ane.status()["calls"] == calls + 1
    assert rel_err(got, big[2]) < 1e-3
    got = ab.linear_backward_dx(small[0], small[1], backend="auto")
    assert ane.status()["calls"] == calls + 1, "small call stayed on the CPU"
    assert rel_err(got, small[2]) < 1e-6
    assert ane.routes("ane", "linear_backward_dx", N=1, n_in=1, n_out=1)
    assert not ane.routes("auto", "linear_backward_dx", N=64, n_in=20000, n_out=96)
    assert not ane.routes("auto", "linear_backward_dW", N=64, n_in=96, n_out=96)
    assert not ane.routes("cpu", "linear_backward_dx", N=64, n_in=96, n_out=96)


def test_status_reports_the_emulator(emulator, rng):
    st = ane.status()
    assert st["available"] and st["platform"] == "emulated" and st["reason"] is None
    assert st["max_programs"] == 100 and st["loss_scaling"] is True
    assert st["fp16_path"] in ("f16c", "neon", "scalar")


def test_threads_share_one_context(emulator, rng):
    probs = [problem(np.random.default_rng(i), 64, 32, 48) for i in range(4)]
    results = [None] * 4

    def work(i):
        for _ in range(3):
            results[i] = ab.linear_backward_dx(probs[i][0], probs[i][1], backend="ane")

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for (dy, W, ref), got in zip(probs, results):
        assert rel_err(got, ref) < 1e-3
    assert ane.status()["compiles"] == 1


def test_bad_arguments(emulator, rng):
    dy, W, _ = problem(rng, 4, 6, 5)
    with pytest.raises(TypeError, match="dy must have dtype float32"):
        ane.linear_backward_dx(dy.astype(np.float64), W)
    with pytest.raises(ValueError, match="last axis of dy"):
        ane.linear_backward_dx(dy[:, :4].copy(), W)
    with pytest.raises(ValueError, match="backend must be 'ane' or 'auto'"):
        ane.linear_backward_dx(dy, W, backend="cpu")
    with pytest.raises(ValueError, match="accumulate=True needs"):
        ane.linear_backward_dx(dy, W, accumulate=True)
    with pytest.raises(ValueError, match="tile_rows must be a multiple of 32"):
        ane.configure(tile_rows=33)
    with pytest.raises(TypeError, match="loss_scaling"):
        ane.configure(loss_scaling=1)
    with pytest.raises(ValueError, match="use_emulator"):
        ane.use_emulator("yes")
    with pytest.raises(TypeError, match="mil must be a str"):
        ane.run_mil(b"program", np.zeros(2, np.float16), (2,))


@pytest.fixture
def fail_next():
    from anebackward._native import ffi, lib

    def arm(stage):
        assert lib.ab_ane_emulated_fail_next(stage.encode()) == 0
    yield arm
    lib.ab_ane_emulated_fail_next(ffi.NULL)


@pytest.mark.parametrize("stage", ["compile", "load"])
def test_build_failure_strict_raises_with_the_platform_message(emulator, rng, fail_next, stage):
    from anebackward.errors import AnebackwardError
    dy, W, ref = problem(rng, 32, 16, 24)
    fail_next(stage)
    with pytest.raises(AnebackwardError, match=f"emulated platform, {stage} of the linear_backward_dx "
                                               f"program \\(S=32, in=16, out=24\\) failed: injected {stage} failure"):
        ab.linear_backward_dx(dy, W, backend="ane")
    # the failed shape is remembered: no second compile, same message
    with pytest.raises(AnebackwardError, match=f"injected {stage} failure"):
        ab.linear_backward_dx(dy, W, backend="ane")
    assert ane.status()["compiles"] == 1


@pytest.mark.parametrize("stage", ["compile", "load"])
def test_build_failure_auto_never_fails(emulator, rng, fail_next, stage):
    ane.configure(min_flops=0)
    dy, W, ref = problem(rng, 32, 16, 24)
    fail_next(stage)
    got = ab.linear_backward_dx(dy, W, backend="auto")
    assert ane.last_call()["fallback"] == "platform error"
    assert rel_err(got, ref) < 1e-6
    st = ane.status()
    assert f"injected {stage} failure" in st["last_error"] and st["fallbacks"]["error"] == 1
    ab.linear_backward_dx(dy, W, backend="auto")
    assert ane.status()["compiles"] == 1, "a failed shape is not compiled again"


def test_evaluate_failure(emulator, rng, fail_next):
    from anebackward.errors import AnebackwardError
    ane.configure(min_flops=0)
    dy, W, ref = problem(rng, 32, 16, 24)
    fail_next("evaluate")
    out = np.zeros((32, 16), np.float32)
    with pytest.raises(AnebackwardError, match="emulated platform, evaluate linear_backward_dx .*: "
                                               "injected evaluate failure"):
        ab.linear_backward_dx(dy, W, dx=out, backend="ane")
    assert rel_err(out, ref) < 1e-6, "the failed tile was still computed (on the CPU)"
    fail_next("evaluate")
    got = ab.linear_backward_dx(dy, W, backend="auto")     # auto: CPU result
    assert ane.last_call()["fallback"] == "platform error" and rel_err(got, ref) < 1e-6
    got = ab.linear_backward_dx(dy, W, backend="ane")      # evaluation errors may be transient
    assert ane.last_call()["fallback"] is None and rel_err(got, ref) < 1e-3


def test_self_test_passes_and_reports_failures(emulator, fail_next):
    assert ane.self_test() is None
    assert ane.status()["compiles"] == 1 and ane.status()["cache_size"] == 1
    ane.reset()
    fail_next("evaluate")
    why = ane.self_test()
    assert "emulated platform failed its self-test" in why and "injected evaluate failure" in why
