"""Fuzz the emulated platform's MIL reader and interpreter with seeded
mutations of valid programs (tests/ane_mil_fuzz.py) for a few seconds, in a
child process: any outcome but success or the documented errors — including
a crash — fails, with the case printed."""
import pathlib
import subprocess
import sys

import pytest

FUZZ = pathlib.Path(__file__).parent / "ane_mil_fuzz.py"


@pytest.mark.parametrize("seed", [1, 2])
def test_mutated_mil_gives_a_result_or_a_documented_error(seed):
    r = subprocess.run([sys.executable, str(FUZZ), str(seed), "2.0"], capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, "ANEBACKWARD_ANE": "emulate"})
    assert r.returncode == 0, f"fuzz seed {seed} (exit {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    counts = dict(kv.split("=") for kv in r.stdout.split()[-3:])
    assert int(counts["cases"]) > 50 and int(counts["ran"]) > 0 and int(counts["rejected"]) > 0
