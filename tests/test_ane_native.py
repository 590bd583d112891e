"""The real Neural Engine (darwin platform). Opt-in, because it needs a Mac
with Apple Silicon whose ANE the process may use (GitHub's hosted macOS
runners are virtual machines and usually cannot reach it):

    ANEBACKWARD_TEST_NATIVE_ANE=1 python -m pytest tests/test_ane_native.py

With the variable set, every failure here is a real failure (no skips)."""
import os

import numpy as np
import pytest

import anebackward as ab
from anebackward import ane
from anebackward.errors import AnebackwardError
from conftest import ane_platform

pytestmark = pytest.mark.skipif(os.environ.get("ANEBACKWARD_TEST_NATIVE_ANE") != "1",
                                reason="opt-in hardware test: set ANEBACKWARD_TEST_NATIVE_ANE=1 on an "
                                       "Apple Silicon Mac")


@pytest.fixture
def native(monkeypatch):
    """The native platform only (no emulator)."""
    with ane_platform(monkeypatch, False) as a:
        yield a


def test_native_platform_is_available(native):
    st = ane.status()
    assert st["available"], st["reason"]
    assert st["platform"] == "darwin"


@pytest.mark.parametrize("N,n_in,n_out", [(256, 288, 768), (256, 768, 288), (256, 768, 768), (37, 64, 96)])
def test_native_dx_matches_fp32(native, N, n_in, n_out):
    rng = np.random.default_rng(N + n_in)
    dy = rng.standard_normal((N, n_out)).astype(np.float32)
    W = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
    ref = dy.astype(np.float64) @ W.astype(np.float64)
    got = ab.linear_backward_dx(dy, W, backend="ane")
    assert ane.last_call()["tiles_cpu"] == 0, ane.status()
    # the ANE's accumulation precision is not documented: allow 4x the emulator's bound
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 4e-3


def test_native_small_gradients_with_loss_scaling(native):
    rng = np.random.default_rng(5)
    dy = (rng.standard_normal((64, 256)) * 1e-6).astype(np.float32)
    W = (rng.standard_normal((256, 96)) * 0.02).astype(np.float32)
    ref = dy.astype(np.float64) @ W.astype(np.float64)
    got = ab.linear_backward_dx(dy, W, backend="ane")
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 4e-3


def test_native_compile_error_carries_the_framework_message(native):
    with pytest.raises(AnebackwardError, match="darwin platform, compile"):
        ane.run_mil("program(1.3)\n{\n}\n", np.zeros(4, np.float16), (4,))


def test_native_self_test_report(native):
    assert ane.status()["self_test"].startswith("passed"), ane.status()["self_test"]


def test_native_staged_weights_and_overlap(native):
    rng = np.random.default_rng(9)
    W = (rng.standard_normal((768, 768)) * 0.02).astype(np.float32)
    x = rng.standard_normal((256, 768)).astype(np.float32)
    dy = rng.standard_normal((256, 768)).astype(np.float32)
    ref = dy.astype(np.float64) @ W.astype(np.float64)
    for _ in range(2):
        dx, dW = ane.linear_backward(dy, x, W, w_version=1)
        assert np.linalg.norm(dx - ref) / np.linalg.norm(ref) < 4e-3
    assert ane.last_call()["w_staged"] is False and ane.last_call()["tiles_cpu"] == 0
    np.testing.assert_allclose(dW, dy.T @ x, rtol=1e-4, atol=1e-3)


def test_native_probe_runs():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "anebackward.ane.probe", "--repeat", "1", "--compiles", "20"],
                       capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WRONG" not in r.stdout and "ERROR" not in r.stdout, r.stdout
