"""The README's NumPy example runs and computes what it says."""
import pathlib
import re

import numpy as np

from oracle import assert_close, f64

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_numpy_example_runs_and_is_correct():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    x, w, W, dh = (f64(ns[k]) for k in ("x", "w", "W", "dh"))
    xn = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
    assert_close(ns["h"], xn @ W.T, rtol=1e-4, atol=1e-4, what="h")
    assert_close(ns["dW"], dh.T @ xn, rtol=1e-4, atol=1e-3, what="dW")
