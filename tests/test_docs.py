"""The documentation runs as written.

Every ```python block of README.md and docs/*.md is executed in a fresh
namespace in a temporary directory (blocks that import torch or transformers
need them: required in CI, skipped with the reason elsewhere). A block that
must not run is preceded by a line `<!-- docs-test: skip REASON -->`; the
marks are counted, so that they cannot grow silently. Every `anebackward`
command shown in a shell block names a subcommand that exists and answers
`--help`; the README stays a front door (at most 250 lines)."""
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import bf16_runnable, import_hf, import_hf_test, import_torch
from oracle import assert_close, f64

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README] + DOCS
SKIP_MARK = "<!-- docs-test: skip"
EXPECTED_SKIP_MARKS = 0   # raise only together with a mark whose reason says why
BLOCK = re.compile(r"(<!-- docs-test: skip (?P<why>[^>]*?) -->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def _rel(page):
    return page.relative_to(ROOT).as_posix()


def _blocks(pages=PAGES):
    out = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code")) + 1
            out.append(pytest.param(page, m.group("code"), m.group("why"), id=f"{_rel(page)}:{line}"))
    return out


def test_docs_have_python_blocks():
    assert len(_blocks([README])) >= 4
    assert len(_blocks(DOCS)) >= 5


def test_skip_marks_are_counted():
    marks = sum(p.read_text(encoding="utf-8").count(SKIP_MARK) for p in PAGES)
    assert marks == EXPECTED_SKIP_MARKS, (
        f"{marks} blocks are marked not to run, expected {EXPECTED_SKIP_MARKS}: make the block "
        "runnable, or change EXPECTED_SKIP_MARKS in the same commit as the mark")


@pytest.mark.parametrize("page,code,skip_reason", _blocks())
def test_python_block_runs(page, code, skip_reason, tmp_path, monkeypatch):
    if skip_reason:
        pytest.skip(f"{_rel(page)} marks this block: {skip_reason}")
    if re.search(r"^\s*(from|import) (anebackward\.)?torch\b", code, re.M):
        import_torch()   # the PyTorch blocks need torch (required in CI)
    if re.search(r"^\s*(from|import) (anebackward\.)?transformers\b", code, re.M) or "_pretrained(" in code:
        import_hf()      # the Hugging Face blocks need the hf extra (required in CI)
    if re.search(r"^\s*(from|import) peft\b", code, re.M):
        import_hf_test("peft")   # the peft blocks need the hf-test extra (required in CI)
    monkeypatch.chdir(tmp_path)   # blocks may write files (model.bin)
    monkeypatch.delenv("ANEBACKWARD_BACKEND", raising=False)
    with bf16_runnable():         # without oneDNN the bf16 blocks run on the portable path
        exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})


def test_numpy_example_runs_and_is_correct():
    code = _blocks([README])[0].values[1]
    assert "ab.linear(" in code and len(code.strip().splitlines()) <= 12
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    x, w, W, dh = (f64(ns[k]) for k in ("x", "w", "W", "dh"))
    xn = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
    assert_close(ns["h"], xn @ W.T, rtol=1e-4, atol=1e-4, what="h")
    assert_close(ns["dW"], dh.T @ xn, rtol=1e-4, atol=1e-3, what="dW")


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    # the two set-up commands, word for word
    assert "pip install . && anebackward train\n" in text
    assert "pip install -e '.[test]' && python -m pytest -q\n" in text


def _shell_lines(text):
    """The lines of the ```sh / ```bash / ```console / bare ``` blocks."""
    fence = None
    for line in text.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence in ("sh", "bash", "console", ""):
            yield line


def _shown_commands():
    """(page, subcommand) for every `anebackward X` / `python -m anebackward X`
    in a shell block, and (page, module) for `python -m anebackward.mod`."""
    cmds, modules = set(), set()
    for page in PAGES:
        for line in _shell_lines(page.read_text(encoding="utf-8")):
            line = line.lstrip("$ ")
            for sub in re.findall(r"(?:^|[\s;&|(])(?:python3? -m )?anebackward (\w[\w-]*)", line):
                cmds.add((_rel(page), sub))
            for mod in re.findall(r"python3? -m (anebackward\.[\w.]+)", line):
                modules.add((_rel(page), mod))
    return sorted(cmds), sorted(modules)


def test_shell_blocks_show_commands():
    cmds, modules = _shown_commands()
    assert {c for _, c in cmds} >= {"train", "sample", "bench", "config"}
    assert modules


@pytest.mark.parametrize("page,sub", _shown_commands()[0])
def test_shown_subcommand_exists(page, sub):
    r = subprocess.run([sys.executable, "-m", "anebackward", sub, "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, \
        f"{page} shows `anebackward {sub}`, but `anebackward {sub} --help` fails: {r.stderr[-2000:]}"


@pytest.mark.parametrize("page,module", _shown_commands()[1])
def test_shown_module_answers_help(page, module):
    if module.split(".")[1] in ("torch", "transformers") or module.endswith(("torch_step", "hf_step",
                                                                           "hf_memory", "qwen3_step",
                                                                           "hf_padded")):
        import_torch()
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, (page, module, r.stderr[-2000:])
