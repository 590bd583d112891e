"""The `anebackward selfcheck` command runs and passes on both backends."""
import subprocess
import sys

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
