"""Where the C library is, for C programs: `anebackward config --cflags --libs`.

    cc train.c $(anebackward config --cflags --libs) -o train

The same facts from Python: anebackward.get_include(), get_lib_dir(),
get_library() (as numpy.get_include() and scipy_openblas32.get_lib_dir()),
and a pkg-config file (--pkgconfigdir prints its directory).

The .pc file names the BLAS by a path relative to itself, which holds in a
regular install (site-packages/anebackward/lib/pkgconfig ->
site-packages/scipy_openblas32/lib). In an editable install the package is
the source tree, where that path leads nowhere: --pkgconfigdir then first
rewrites the tree's .pc with the installed wheel's absolute directory, so
that `PKG_CONFIG_PATH=$(anebackward config --pkgconfigdir) pkg-config ...`
links in both.

--libs names libanebackward with an rpath to its directory, and on Linux the
BLAS it needs (the scipy-openblas32 wheel installed next to it) with its own
rpath, linked even under --as-needed: a program then links and runs without
LD_LIBRARY_PATH, also from an editable install where the library's own
relative RUNPATH ($ORIGIN/../../scipy_openblas32/lib) cannot reach the wheel.
"""
import argparse
import os
import shlex
import sys
from typing import List

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def get_include() -> str:
    """Directory with anebackward.h (and anebackward/seed_compat.h)."""
    return os.path.join(_PACKAGE_DIR, "include")


def get_lib_dir() -> str:
    """Directory with the shared library libanebackward (and pkgconfig/)."""
    return os.path.join(_PACKAGE_DIR, "lib")


def get_library() -> str:
    """The library name for the linker: -l<get_library()>."""
    return "anebackward"


def _blas_libs() -> List[str]:
    if sys.platform == "darwin":
        return ["-framework", "Accelerate"]
    import scipy_openblas32 as sob
    d: str = sob.get_lib_dir()
    # Kept even under --as-needed (the program itself calls no BLAS): the
    # program's rpath then finds the BLAS also where the library's own
    # relative RUNPATH does not reach it (editable installs).
    return ["-L" + d, "-Wl,-rpath," + d,
            "-Wl,--push-state,--no-as-needed", "-l" + str(sob.get_library()), "-Wl,--pop-state"]


def pkgconfig_dir() -> str:
    """Directory of anebackward.pc, made right for this install first (see above)."""
    d = os.path.join(get_lib_dir(), "pkgconfig")
    pc = os.path.join(d, "anebackward.pc")
    if sys.platform == "darwin" or not os.path.isfile(pc):
        return d
    with open(pc, encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("openblasdir="):
            value = line.split("=", 1)[1].strip().replace("${pcfiledir}", d)
            if os.path.isdir(value):
                return d
            import scipy_openblas32 as sob
            lines[i] = "openblasdir=%s\n" % sob.get_lib_dir()
            from .atomicfile import atomic_write
            try:
                atomic_write(pc, lambda f: f.write("".join(lines).encode()))
            except OSError as e:   # a read-only install: say what works instead
                print(f"anebackward config: {pc} names no existing BLAS directory and cannot be "
                      f"updated ({e.strerror}); link with `anebackward config --cflags --libs`",
                      file=sys.stderr)
            break
    return d


def cflags() -> List[str]:
    return ["-I" + get_include()]


def libs() -> List[str]:
    d = get_lib_dir()
    return ["-L" + d, "-Wl,-rpath," + d, "-l" + get_library()] + _blas_libs() + ["-lm"]


def _missing_files() -> List[str]:
    name = "libanebackward.dylib" if sys.platform == "darwin" else "libanebackward.so"   # the dev link
    return [p for p in (os.path.join(get_include(), "anebackward.h"),
                        os.path.join(get_lib_dir(), name)) if not os.path.exists(p)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cflags", action="store_true", help="compiler flags (-I...)")
    parser.add_argument("--libs", action="store_true", help="linker flags (-L... -l...)")
    parser.add_argument("--includedir", action="store_true", help="the include directory")
    parser.add_argument("--libdir", action="store_true", help="the library directory")
    parser.add_argument("--pkgconfigdir", action="store_true",
                        help="the directory of anebackward.pc (for PKG_CONFIG_PATH)")
    parser.add_argument("--version", action="store_true", help="the library version")


def run(args: argparse.Namespace) -> int:
    missing = _missing_files()
    if missing:
        print("anebackward config: this install has no C library (missing "
              + ", ".join(missing) + "); reinstall with `pip install .`, or rebuild in place with "
              "`python setup.py build_ext --inplace`", file=sys.stderr)
        return 1
    out = []
    if args.version:
        from ._version import __version__
        out.append(__version__)
    if args.includedir:
        out.append(shlex.quote(get_include()))
    if args.libdir:
        out.append(shlex.quote(get_lib_dir()))
    if args.pkgconfigdir:
        out.append(shlex.quote(pkgconfig_dir()))
    flags = (cflags() if args.cflags else []) + (libs() if args.libs else [])
    if flags:
        out.append(" ".join(shlex.quote(f) for f in flags))
    if not out:
        print("anebackward config: say what to print, e.g. --cflags --libs", file=sys.stderr)
        return 2
    print(" ".join(out))
    return 0
