"""The darwin ANE platform (csrc/ane/ane_darwin.c) can only run on a Mac, but
its C must not rot elsewhere: compile it with -fsyntax-only against the
header stand-ins in tests/darwin_stubs (declarations of the objc runtime,
CoreFoundation and IOSurface functions it calls). On macOS the real build
compiles it, so this check is not needed there."""
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.platform == "darwin", reason="the package build compiles ane_darwin.c on macOS")
@pytest.mark.parametrize("guard", [[], ["-DAB_ANE_OBJC_GUARD"]], ids=["unguarded", "objc-guard"])
def test_darwin_platform_compiles_against_stand_in_headers(guard):
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    assert shutil.which(cc[0]), f"no C compiler {cc[0]!r} (one built this package)"
    cmd = cc + ["-fsyntax-only", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                "-Werror=implicit-function-declaration", "-Werror=incompatible-pointer-types",
                "-Werror=int-conversion", "-Werror=return-type", "-D__APPLE__", "-D__arm64__", *guard,
                "-I", str(ROOT / "tests" / "darwin_stubs"), "-I", str(ROOT / "csrc"),
                "-I", str(ROOT / "csrc" / "ane"), str(ROOT / "csrc" / "ane" / "ane_darwin.c")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _ffibuild():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_ab_ffibuild", ROOT / "ffibuild.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_macos_build_compiles_the_objc_guard_and_turns_it_on(monkeypatch):
    """On macOS the sources (compiled once, by clibbuild, for both the cffi
    module and libanebackward) include ane_darwin_guard.m and every source
    sees AB_ANE_OBJC_GUARD, so ane_darwin.c's guarded branch is the one
    built; elsewhere neither. (No compiler here builds Objective-C: the
    guarded branch of ane_darwin.c is compiled above against the stand-ins.)"""
    from setuptools._distutils.unixccompiler import UnixCCompiler
    fb = _ffibuild()
    guard = os.path.join("csrc", "ane", "ane_darwin_guard.m")
    here = fb.c_sources()
    assert guard not in here and ("AB_ANE_OBJC_GUARD", None) not in fb.build_options()["define_macros"]
    monkeypatch.setattr(sys, "platform", "darwin")
    mac = fb.c_sources()
    assert guard in mac and os.path.join("csrc", "ane", "ane_darwin.c") in mac
    assert ("AB_ANE_OBJC_GUARD", None) in fb.build_options()["define_macros"]
    # setuptools' Unix compiler (the one on macOS) takes .m sources
    assert ".m" in UnixCCompiler.src_extensions


def test_the_guard_is_declared_as_the_objc_file_defines_it():
    import re
    proto = re.compile(r"int ab_ane_darwin_try\(([^)]*\([^)]*\)[^)]*)\)")
    decl = proto.findall((ROOT / "csrc" / "ane" / "ane_darwin.c").read_text())
    defs = proto.findall((ROOT / "csrc" / "ane" / "ane_darwin_guard.m").read_text())
    assert decl and defs and set(decl) == set(defs), (decl, defs)
