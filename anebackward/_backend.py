"""Backend choice for every kernel: backend= argument, else the
ANEBACKWARD_BACKEND environment variable, else "auto".

  "auto"      fast CPU kernels (BLAS + SIMD); the ANE where it is available
              and the kernel is routed there (anebackward.ane); never fails.
  "cpu"       fast CPU kernels.
  "reference" the seed's scalar loops, math corrected (baseline / oracle).
  "ane"       the Apple Neural Engine for the kernels routed to it, the fast
              CPU kernels for the rest; AneUnavailableError where no ANE.
"""
import os

from ._native import lib

BACKENDS = ("auto", "cpu", "reference", "ane")


def resolve(fn, backend):
    """The backend name to use for one call."""
    if backend is None:
        backend = os.environ.get("ANEBACKWARD_BACKEND") or "auto"
        source = "ANEBACKWARD_BACKEND"
    else:
        source = "backend"
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: {source} must be one of {', '.join(map(repr, BACKENDS))}, "
                         f"got {backend!r}")
    if backend == "ane":
        from . import ane
        ane.require()
    return backend


def cfunc_for(resolved, name):
    """The C function of kernel `name` for an already resolved backend
    (the CPU side: "ane" and "auto" use the fast CPU kernel)."""
    return getattr(lib, ("ab_ref_" if resolved == "reference" else "ab_") + name)


def cfunc(fn, name, backend):
    """The C function implementing kernel `name` for this call's backend."""
    return cfunc_for(resolve(fn, backend), name)
