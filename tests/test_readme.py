"""The README's Python blocks run as pasted, and the NumPy example computes
what it says. Every ```python block of README.md is extracted and run in a
fresh namespace in a temporary directory; a block that must not run is
preceded by a line `<!-- readme-test: skip REASON -->` (none is, today)."""
import pathlib
import re

import numpy as np
import pytest

from conftest import import_hf, import_torch
from oracle import assert_close, f64

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- readme-test: skip (?P<why>[^>]*?) -->\s*\n)?```python\n(?P<code>.*?)```",
                   re.S)


def _blocks():
    text = README.read_text()
    return [pytest.param(m.group("code"), m.group("why"),
                         id=f"line{text.count(chr(10), 0, m.start('code')) + 1}")
            for m in BLOCK.finditer(text)]


def test_readme_has_python_blocks():
    assert len(_blocks()) >= 4


@pytest.mark.parametrize("code,skip_reason", _blocks())
def test_readme_block_runs(code, skip_reason, tmp_path, monkeypatch):
    if skip_reason:
        pytest.skip(f"README marks this block: {skip_reason}")
    if re.search(r"^\s*(from|import) (anebackward\.)?torch\b", code, re.M):
        import_torch()   # the PyTorch blocks need torch (required in CI)
    if re.search(r"^\s*(from|import) transformers\b", code, re.M) or "_pretrained(" in code:
        import_hf()      # the Hugging Face blocks need the hf extra (required in CI)
    monkeypatch.chdir(tmp_path)   # blocks may write files (model.bin)
    monkeypatch.delenv("ANEBACKWARD_BACKEND", raising=False)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def test_numpy_example_runs_and_is_correct():
    code = _blocks()[0].values[0]
    assert len(code.strip().splitlines()) <= 12
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    x, w, W, dh = (f64(ns[k]) for k in ("x", "w", "W", "dh"))
    xn = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
    assert_close(ns["h"], xn @ W.T, rtol=1e-4, atol=1e-4, what="h")
    assert_close(ns["dW"], dh.T @ xn, rtol=1e-4, atol=1e-3, what="dW")
