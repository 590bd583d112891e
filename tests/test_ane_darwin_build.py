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
