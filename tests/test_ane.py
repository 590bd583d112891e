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
from conftest import ane_platform

not_mac = pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the native platform may exist")


@pytest.fixture
def native(monkeypatch):
    """The platform as the environment would choose it, no emulator."""
    with ane_platform(monkeypatch, None) as a:
        yield a


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


def test_the_default_backend_is_the_cpu_even_where_the_ane_runs(emulator, monkeypatch, rng):
    """The ANE is opt-in: with the emulator available, a kernel or a model
    given no backend (and no ANEBACKWARD_BACKEND) never reaches it."""
    monkeypatch.delenv("ANEBACKWARD_BACKEND", raising=False)
    assert ane.available()
    ane.configure(min_flops=0)
    dy, W, _ = problem(rng, 64, 64, 64)
    assert np.array_equal(ab.linear_backward_dx(dy, W), ab.linear_backward_dx(dy, W, backend="cpu"))
    m = ab.Llama(ab.LlamaConfig(dim=64, hidden_dim=128, n_layers=1, n_heads=2, n_kv_heads=2,
                                vocab_size=32, max_seq_len=16))
    assert m.backend == "cpu"
    m.forward(np.arange(16, dtype=np.int32) % 32)
    m.backward()
    assert ane.status()["calls"] == 0 and m.ane_reason == "backend='cpu'"
    monkeypatch.setenv("ANEBACKWARD_BACKEND", "auto")
    assert ab.Llama(m.config).backend == "auto"


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
    dy, W, _ = problem(rng, 128, 32, 48)
    ab.linear_backward_dx(dy, W, backend="ane")
    assert ane.status()["compiles"] == 1 and ane.status()["cache_size"] == 1
    dy2, W2, ref2 = problem(rng, 128, 32, 48)             # same shape, new weights: no compile
    got = ab.linear_backward_dx(dy2, W2, backend="ane")
    assert ane.status()["compiles"] == 1
    assert rel_err(got, ref2) < 1e-3, "weights are data, not baked into the program"
    ab.linear_backward_dx(dy[:100], W, backend="ane")     # 100 rows -> S=128 again
    assert ane.status()["compiles"] == 1
    ab.linear_backward_dx(dy[:40], W, backend="ane")      # 40 rows -> S=64: new program
    assert ane.status()["compiles"] == 2 and ane.status()["cache_size"] == 2
    # in and out are padded to multiples of 64 too: 20 x 50 runs in the 64 x 64 program
    dy3, W3, ref3 = problem(rng, 40, 20, 50)
    got = ab.linear_backward_dx(dy3, W3, backend="ane")
    assert ane.status()["compiles"] == 2 and rel_err(got, ref3) < 1e-3
    dy4, W4, ref4 = problem(rng, 40, 65, 64)              # in 65 -> 128: a new program
    got = ab.linear_backward_dx(dy4, W4, backend="ane")
    assert ane.status()["compiles"] == 3 and rel_err(got, ref4) < 1e-3


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


def test_fp16_overflow_is_rerun_at_a_lower_scale(emulator, rng):
    dy, W, ref = problem(rng, 64, 32, 128, w_scale=100.0)  # |dx| above 65504 at the first scale only
    got = ab.linear_backward_dx(dy, W, backend="ane")
    info, st = ane.last_call(), ane.status()
    assert st["overflow_reruns"] == 1 and st["fallbacks"]["overflow"] == 0
    assert info["fallback"] is None and info["tiles_cpu"] == 0
    assert info["scale_log2"] == ane.last_call()["scale_log2"] and info["scale_log2"] < 0
    assert rel_err(got, ref) < 1e-3


@pytest.mark.parametrize("saturate", [False, True])
def test_fp16_overflow_falls_back_to_the_cpu(emulator, rng, saturate):
    """inf, or (hardware that saturates) +-65504, even at the lower scale."""
    from anebackward._native import lib
    dy, W, _ = problem(rng, 64, 32, 128, w_scale=5000.0)
    lib.ab_ane_emulated_saturate(int(saturate))
    try:
        got = ab.linear_backward_dx(dy, W, backend="ane")
    finally:
        lib.ab_ane_emulated_saturate(0)
    assert ane.last_call()["fallback"] == "fp16 overflow or saturation" and ane.last_call()["tiles_cpu"] == 1
    st = ane.status()
    assert st["fallbacks"]["overflow"] == 1 and st["overflow_reruns"] == 1
    assert np.array_equal(got, ab.linear_backward_dx(dy, W, backend="cpu"))


def test_saturated_results_are_not_taken_for_values(emulator, rng):
    """The emulator in saturating mode returns finite +-65504 where the true
    value overflows; the dispatch must not hand those back as dx."""
    from anebackward._native import lib
    ane.configure(loss_scaling=False)                       # no re-run: straight to the check
    dy, W, _ = problem(rng, 64, 32, 128, w_scale=2000.0)
    dy *= np.float32(8.0)
    ref = dy.astype(np.float64) @ W.astype(np.float64)
    lib.ab_ane_emulated_saturate(1)
    try:
        got = ab.linear_backward_dx(dy, W, backend="ane")
    finally:
        lib.ab_ane_emulated_saturate(0)
    assert np.abs(ref).max() > 65504, "the problem does overflow fp16"
    assert ane.last_call()["fallback"] == "fp16 overflow or saturation"
    assert rel_err(got, ref) < 1e-6


def test_overflow_in_one_tile_keeps_accumulate_exact(emulator, rng):
    ane.configure(tile_rows=64, loss_scaling=False)
    dy, W, ref = problem(rng, 128, 24, 64, w_scale=1.0)
    dy[64:] *= 1e4                                         # second tile overflows fp16 unscaled
    ref = dy.astype(np.float64) @ W.astype(np.float64)
    out = rng.standard_normal((128, 24)).astype(np.float32)
    start = out.copy()
    ab.linear_backward_dx(dy, W, dx=out, accumulate=True, backend="ane")
    info = ane.last_call()
    assert info["tiles"] == 2 and info["tiles_cpu"] == 1 and info["fallback"] == "fp16 overflow or saturation"
    want = start + ref
    assert np.abs(out[:64] - want[:64]).max() <= 2e-3 * np.abs(ref[:64]).max() + 1e-6   # ANE tile
    cpu = start.copy()                                     # the CPU tile is the CPU kernel's result
    ab.linear_backward_dx(dy[64:], W, dx=cpu[64:], accumulate=True, backend="cpu")
    assert np.array_equal(out[64:], cpu[64:])


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
    dy2, W2, ref2 = problem(rng, 32, 80, 8)               # in 80 -> 128: another program
    got = ab.linear_backward_dx(dy2, W2, backend="ane")
    assert ane.last_call()["fallback"] == "compile budget spent"
    assert ane.status()["compiles"] == 1 and ane.status()["fallbacks"]["budget"] == 1
    assert "budget of 1 programs per process is spent" in ane.status()["last_error"]
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
    assert "min_flops" in ane.route_reason("auto", "linear_backward_dx", N=8, n_in=96, n_out=96)
    assert not ane.routes("auto", "linear_backward_dW", N=64, n_in=96, n_out=96)
    assert not ane.routes("cpu", "linear_backward_dx", N=64, n_in=96, n_out=96)


def test_status_reports_the_emulator(emulator, rng):
    st = ane.status()
    assert st["available"] and st["platform"] == "emulated" and st["reason"] is None
    assert st["max_programs"] == 100 and st["loss_scaling"] is True
    assert st["fp16_path"] in ("f16c", "neon", "scalar")
    assert st["process_compiles"] == 0 and st["compiles_remaining"] == 100
    assert st["self_test"] == "not run"                    # the emulator does not test itself at open


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
    with pytest.raises(ValueError, match="tile_rows must be a multiple of 64"):
        ane.configure(tile_rows=32)
    with pytest.raises(ValueError, match="w_version must be a non-negative"):
        ane.linear_backward_dx(dy, W, w_version=-1)
    with pytest.raises(TypeError, match="loss_scaling"):
        ane.configure(loss_scaling=1)
    with pytest.raises(ValueError, match="use_emulator"):
        ane.use_emulator("yes")
    with pytest.raises(TypeError, match="mil must be a str"):
        ane.run_mil(b"program", np.zeros(2, np.float16), (2,))


@pytest.fixture
def fail_next():
    from anebackward._native import ffi, lib

    def arm(stage, times=1, msg_bytes=0):
        assert lib.ab_ane_emulated_fail_next(stage.encode(), times, msg_bytes) == 0
    yield arm
    lib.ab_ane_emulated_fail_next(ffi.NULL, 0, 0)


# a load is retried once, so it takes two failures in a row to fail a build
BUILD_FAILURES = [("compile", 1), ("load", 2)]


@pytest.mark.parametrize("stage,times", BUILD_FAILURES)
def test_build_failure_strict_raises_with_the_platform_message(emulator, rng, fail_next, stage, times):
    from anebackward.errors import AnebackwardError
    dy, W, ref = problem(rng, 32, 16, 24)
    fail_next(stage, times)
    with pytest.raises(AnebackwardError, match=f"emulated platform, {stage} of the linear_backward_dx "
                                               f"program \\(S=64, in=64, out=64\\) failed: injected {stage} failure"):
        ab.linear_backward_dx(dy, W, backend="ane")
    # the failed shape is remembered: no second compile, same message
    with pytest.raises(AnebackwardError, match=f"injected {stage} failure"):
        ab.linear_backward_dx(dy, W, backend="ane")
    assert ane.status()["compiles"] == 1
    # ... until the cache is cleared: then it is compiled again (and works)
    ane.clear_cache()
    got = ab.linear_backward_dx(dy, W, backend="ane")
    assert ane.status()["compiles"] == 2 and ane.last_call()["fallback"] is None
    assert rel_err(got, ref) < 1e-3


def test_transient_load_failure_is_retried_once(emulator, rng, fail_next):
    dy, W, ref = problem(rng, 32, 16, 24)
    fail_next("load", 1)
    got = ab.linear_backward_dx(dy, W, backend="ane")
    st = ane.status()
    assert st["load_retries"] == 1 and st["compiles"] == 1 and st["last_error"] is None
    assert ane.last_call()["fallback"] is None and rel_err(got, ref) < 1e-3


def test_long_platform_messages_arrive_whole(emulator, rng, fail_next):
    from anebackward.errors import AnebackwardError
    dy, W, _ = problem(rng, 32, 16, 24)
    fail_next("compile", 1, msg_bytes=5000)
    with pytest.raises(AnebackwardError) as e:
        ab.linear_backward_dx(dy, W, backend="ane")
    msg = str(e.value)
    assert "injected compile failure" in msg and "x" * 4000 in msg and "@END" in msg
    assert ane.status()["last_error"].endswith("@END")
    fail_next("evaluate", 1, msg_bytes=6000)
    ane.clear_cache()
    with pytest.raises(AnebackwardError, match="@END"):
        ab.linear_backward_dx(dy, W, backend="ane")


@pytest.mark.parametrize("stage,times", BUILD_FAILURES)
def test_build_failure_auto_never_fails(emulator, rng, fail_next, stage, times):
    ane.configure(min_flops=0)
    dy, W, ref = problem(rng, 32, 16, 24)
    fail_next(stage, times)
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
    st = ane.status()
    assert st["compiles"] == 1 and st["cache_size"] == 1
    assert st["self_test"].startswith("passed: 256x768x768 dx, relative error")
    rel = float(st["self_test"].split("relative error ")[1].split()[0])
    assert 1e-5 < rel < 4e-3, "fp16 rounding shows, within the tolerance"
    ane.reset()
    fail_next("evaluate")
    why = ane.self_test()
    assert "emulated platform failed its self-test" in why and "injected evaluate failure" in why
    assert ane.status()["self_test"] == why


def test_a_failing_self_test_at_open_turns_the_ane_off_with_its_reason(emulator, fail_next, rng):
    """The open-time gate (the darwin platform's) run on the emulator: a
    platform whose self-test fails is not available, status() and
    backend="ane" say why, "auto" computes on the CPU; a passing one opens."""
    from anebackward._native import lib
    lib.ab_ane_testing_self_test_on_open(1)
    try:
        fail_next("evaluate")
        assert ane.available() is False
        why = ane.status()["reason"]
        assert "emulated platform failed its self-test" in why and "injected evaluate failure" in why
        dy, W, _ = problem(rng, 64, 64, 64)
        with pytest.raises(AneUnavailableError, match="failed its self-test"):
            ab.linear_backward_dx(dy, W, backend="ane")
        assert np.array_equal(ab.linear_backward_dx(dy, W, backend="auto"),
                              ab.linear_backward_dx(dy, W, backend="cpu"))
        ane.reset()
        assert ane.available() is True
        assert ane.status()["self_test"].startswith("passed: 256x768x768 dx")
    finally:
        lib.ab_ane_testing_self_test_on_open(0)


def test_self_test_tolerates_fp16_rounding_but_not_garbage(emulator, monkeypatch):
    """The self-test compares within fp16 tolerance: values that are not
    exact in fp16 pass; a platform returning saturated values fails it."""
    from anebackward._native import lib
    assert ane.self_test() is None
    ane.reset()
    ane.configure(loss_scaling=False)
    lib.ab_ane_emulated_saturate(1)
    try:
        # with every value clamped nothing changes here (|dx| < 64): still passes
        assert ane.self_test() is None
    finally:
        lib.ab_ane_emulated_saturate(0)


def test_compile_budget_is_per_process(emulator, rng):
    """reset() and new contexts do not give the compiles back."""
    ab.linear_backward_dx(*problem(rng, 32, 16, 24)[:2], backend="ane")
    assert ane.status()["process_compiles"] == 1
    ane.reset()
    ab.linear_backward_dx(*problem(rng, 32, 16, 24)[:2], backend="ane")
    st = ane.status()
    assert st["compiles"] == 1 and st["process_compiles"] == 2 and st["compiles_remaining"] == 98
    ane.configure(max_programs=3)
    ab.linear_backward_dx(*problem(rng, 32, 80, 24)[:2], backend="ane")    # third compile: allowed
    ane.reset()
    dy, W, ref = problem(rng, 32, 16, 200)
    got = ab.linear_backward_dx(dy, W, backend="ane")                      # a fresh context: refused
    assert ane.last_call()["fallback"] == "compile budget spent"
    assert ane.status()["compiles_remaining"] == 0 and rel_err(got, ref) < 1e-6


def test_compile_budget_counts_in_subprocesses_separately(emulator):
    code = ("import anebackward.ane as a, numpy as np; a.use_emulator(True); "
            "a.linear_backward_dx(np.ones((8, 8), np.float32), np.ones((8, 8), np.float32)); "
            "print(a.status()['process_compiles'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
