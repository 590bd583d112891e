"""anebackward/_lib.pyi declares the compiled cffi module as it is: every
function of csrc/anebackward.h (and of the test hooks) with its number of
arguments, every enum constant, nothing more."""
import ast
import os
import subprocess
import sys

import pytest

import anebackward
from anebackward._native import ffi, lib

STUB = os.path.join(os.path.dirname(anebackward.__file__), "_lib.pyi")
TREE = os.path.dirname(os.path.dirname(os.path.abspath(anebackward.__file__)))
GEN = os.path.join(TREE, "tools", "gen_lib_pyi.py")


def stub_members():
    with open(STUB, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Lib")
    funcs = {n.name: len(n.args.posonlyargs) + len(n.args.args) - 1 for n in cls.body if isinstance(n, ast.FunctionDef)}
    consts = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    return funcs, consts


def test_stub_lists_every_function_with_its_arity_and_every_constant():
    funcs, consts = stub_members()
    names = set(dir(lib))
    real_funcs = {n for n in names if not isinstance(getattr(lib, n), int)}
    assert set(funcs) == real_funcs
    assert consts == names - real_funcs
    for name in real_funcs:
        assert funcs[name] == len(ffi.typeof(getattr(lib, name)).args), name


def test_every_function_of_the_installed_header_is_in_the_stub():
    import re
    with open(os.path.join(anebackward.get_include(), "anebackward.h"), encoding="utf-8") as f:
        header = f.read()
    declared = set(re.findall(r"AB_API\s[^;(]*?\b(ab_\w+)\s*\(", header))
    assert "ab_last_error" in declared and len(declared) > 50
    assert declared <= set(stub_members()[0])


@pytest.mark.skipif(not os.path.isfile(GEN), reason="tools/gen_lib_pyi.py is in the source "
                    "tree only (this is an installed copy)")
def test_stub_is_what_the_generator_writes():
    r = subprocess.run([sys.executable, GEN, "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
