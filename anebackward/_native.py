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

def _no_core(e):
    """The C core is missing here: most often a source checkout (no in-place
    build) shadowing an installed copy because it comes first on sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    tree = os.path.dirname(here)
    if os.path.isfile(os.path.join(tree, "setup.py")) and os.path.isdir(os.path.join(tree, "csrc")):
        return ImportError(
            f"anebackward: {here} is the source tree without its C core built in place, and it "
            f"shadows any installed copy; run `pip install -e .` in {tree} (or "
            "`python setup.py build_ext --inplace`), or run from another directory")
    return ImportError(f"anebackward: the C core anebackward._lib is missing from {here}; "
                       f"reinstall the package ({e})")


try:
    from ._lib import ffi, lib  # noqa: E402
except ModuleNotFoundError as e:
    if e.name != __name__.rpartition(".")[0] + "._lib":
        raise
    raise _no_core(e) from None

from .errors import AnebackwardError, Bf16UnavailableError  # noqa: E402

# The one map from C error codes (csrc/anebackward.h) to Python exceptions.
_CODE_TO_EXC = {
    lib.AB_EINVAL: ValueError,
    lib.AB_ERANGE: ValueError,
    lib.AB_EWORKSPACE: ValueError,
    lib.AB_ETOOBIG: ValueError,
    lib.AB_ENOMEM: MemoryError,
    lib.AB_EUNAVAILABLE: Bf16UnavailableError,
}


def exception_for(rc):
    """The exception class for a nonzero C error code (AnebackwardError for
    codes without a more specific Python meaning)."""
    return _CODE_TO_EXC.get(rc, AnebackwardError)


def last_error():
    """This thread's message from the C core for its last refused call (""
    if none since the last clear_error()), e.g. "ab_model_backward: one
    backward per forward: ..."."""
    return ffi.string(lib.ab_last_error()).decode(errors="replace")


def clear_error():
    lib.ab_clear_error()


def check(rc, what):
    """Raise if a C call returned an error code: the exception names `what`,
    says why the C core refused (ab_last_error) and gives the code."""
    if rc != 0:
        why = last_error()
        lib.ab_clear_error()
        msg = ffi.string(lib.ab_strerror(rc)).decode()
        if why:
            msg = why if msg in why else f"{why} ({msg})"
        raise exception_for(rc)(f"{what}: {msg} (C error {rc})")


def fptr(a):
    """float* into a float32 ndarray's own memory (no copy)."""
    return ffi.from_buffer("float[]", a)


def iptr(a):
    """int32_t* into an int32 ndarray's own memory (no copy)."""
    return ffi.from_buffer("int32_t[]", a)


def u16ptr(a):
    """uint16_t* into a uint16 ndarray's own memory (no copy), e.g. bf16 bits."""
    return ffi.from_buffer("uint16_t[]", a)
