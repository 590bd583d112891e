"""Backend choice for every kernel: backend= argument, else the
ANEBACKWARD_BACKEND environment variable, else "cpu".

  "cpu"       fast CPU kernels (BLAS + SIMD); the default everywhere until a
              Mac has measured "auto" winning (docs/ane.md).
  "auto"      the fast CPU kernels, and the ANE where it is available and the
              kernel is routed there (opt-in); never fails.
  "reference" the seed's scalar loops, math corrected (baseline / oracle).
  "ane"       the Apple Neural Engine for the kernels routed to it, the fast
              CPU kernels for the rest; AneUnavailableError where no ANE.
"""
import contextlib
import os
import threading
from typing import Any, Callable, Iterator, List, Optional, Tuple

from ._native import lib

BACKENDS = ("auto", "cpu", "reference", "ane")


def resolve(fn: str, backend: Optional[str]) -> str:
    """The backend name to use for one call."""
    if backend is None:
        backend = os.environ.get("ANEBACKWARD_BACKEND") or "cpu"
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


_local = threading.local()     # .calls: this thread's record_calls() list, if recording


@contextlib.contextmanager
def record_calls() -> Iterator[List[Tuple[Any, Tuple[Any, ...]]]]:
    """Within the block, each kernel's C call made by this thread is
    recorded as (C function, arguments) in the yielded list, and made. The
    benchmark replays such a list to time the C kernels without the Python
    around them."""
    outer = getattr(_local, "calls", None)
    calls: List[Tuple[Any, Tuple[Any, ...]]] = []
    _local.calls = calls
    try:
        yield calls
    finally:
        _local.calls = outer


def cfunc_for(resolved: str, name: str) -> Callable[..., int]:
    """The C function of kernel `name` for an already resolved backend
    (the CPU side: "ane" and "auto" use the fast CPU kernel)."""
    f = getattr(lib, ("ab_ref_" if resolved == "reference" else "ab_") + name)
    calls = getattr(_local, "calls", None)
    if calls is None:
        return f  # type: ignore[no-any-return]

    def recorded(*args: Any) -> int:
        calls.append((f, args))
        return f(*args)  # type: ignore[no-any-return]
    return recorded


def cfunc(fn: str, name: str, backend: Optional[str]) -> Callable[..., int]:
    """The C function implementing kernel `name` for this call's backend."""
    return cfunc_for(resolve(fn, backend), name)
