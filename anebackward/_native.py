"""Loads the compiled C core (anebackward._lib) and turns C error codes into
Python exceptions.

On platforms that use the scipy-openblas32 wheel, its shared library is
loaded with RTLD_GLOBAL before the cffi module is imported: the module was
linked against the copy in the (possibly temporary, build-isolated) build
environment, and this makes the dynamic loader use the installed copy.
"""
import ctypes
import os
import sys


def _preload_openblas():
    if sys.platform == "darwin":
        return None
    import scipy_openblas32 as sob
    path = os.path.join(sob.get_lib_dir(), "lib%s.so" % sob.get_library())
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


_openblas = _preload_openblas()

from ._lib import ffi, lib  # noqa: E402

from .errors import AnebackwardError  # noqa: E402

_CODE_TO_EXC = {
    lib.AB_EINVAL: ValueError,
    lib.AB_ERANGE: ValueError,
    lib.AB_EWORKSPACE: ValueError,
    lib.AB_ETOOBIG: ValueError,
    lib.AB_ENOMEM: MemoryError,
}


def check(rc, what):
    """Raise if a C call returned an error code."""
    if rc != 0:
        msg = ffi.string(lib.ab_strerror(rc)).decode()
        raise _CODE_TO_EXC.get(rc, AnebackwardError)(f"{what}: {msg} (C error {rc})")


def fptr(a):
    """float* into a float32 ndarray's own memory (no copy)."""
    return ffi.from_buffer("float[]", a)


def iptr(a):
    """int32_t* into an int32 ndarray's own memory (no copy)."""
    return ffi.from_buffer("int32_t[]", a)
