"""The `anebackward selfcheck` command runs and passes on both backends."""
import subprocess
import sys

import numpy as np
import pytest

from anebackward.__main__ import main


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_selfcheck_passes(capsys, backend):
    assert main(["selfcheck", "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "FAIL" not in out


def test_selfcheck_fails_when_tolerance_is_impossible(capsys):
    assert main(["selfcheck", "--tol", "0"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "anebackward", "selfcheck"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "all checks passed" in r.stdout


def _failed(capsys):
    out = capsys.readouterr().out
    return {line.split("  ")[2].strip() for line in out.splitlines() if line.startswith("  FAIL")}


def test_wrong_rope_base_fails(monkeypatch, capsys):
    """A RoPE with base 5000 is self-consistent (its backward inverts its
    forward), so the old round-trip check passed it; the formula check must not."""
    import anebackward as ab
    from anebackward import selfcheck as sc

    def rope(x, *, head_dim, pos_offset=0, backend=None, sign=1.0):
        return sc.rope64(np.float64(x), head_dim, pos_offset, sign, base=5000.0).astype(np.float32)
    monkeypatch.setattr(ab, "rope", rope)
    monkeypatch.setattr(ab, "rope_backward", lambda dy, **kw: rope(dy, sign=-1.0, **kw))
    assert main(["selfcheck"]) == 1
    assert _failed(capsys) == {"rope (base 10000)", "rope_backward"}


def test_wrong_attention_scale_fails(monkeypatch, capsys):
    """Attention scaled by 1.5/sqrt(head_dim), forward and backward consistent
    (the old finite-difference check through the same forward passed it)."""
    import anebackward as ab
    attention, attention_backward, c = ab.attention, ab.attention_backward, np.float32(1.5)
    monkeypatch.setattr(ab, "attention", lambda q, k, v, **kw: attention(q * c, k, v, **kw))

    def backward(dout, q, k, v, **kw):
        dq, dk, dv = attention_backward(dout, q * c, k, v, **kw)
        return dq * c, dk, dv
    monkeypatch.setattr(ab, "attention_backward", backward)
    assert main(["selfcheck"]) == 1
    assert _failed(capsys) == {"attention (scale 1/sqrt(head_dim))", "attention_backward dq, dk, dv"}


@pytest.mark.parametrize("kernel", ["embedding", "embedding_backward", "adamw_step",
                                    "clip_grad_norm", "swiglu", "rmsnorm", "linear",
                                    "cross_entropy"])
def test_every_kernel_is_checked(monkeypatch, capsys, kernel):
    """Each kernel's result, perturbed by 1 %, fails its line."""
    import anebackward as ab
    real = getattr(ab, kernel)

    def off(*a, **kw):
        r = real(*a, **kw)
        for t in (a[0] if kernel == "clip_grad_norm" else
                  [a[0]] if kernel == "adamw_step" else []):
            t *= np.float32(1.01)
        if isinstance(r, np.ndarray):
            r *= np.float32(1.01)
        return r * 1.01 if isinstance(r, float) else r
    monkeypatch.setattr(ab, kernel, off)
    assert main(["selfcheck"]) == 1
    assert any(name.startswith(kernel) for name in _failed(capsys))
