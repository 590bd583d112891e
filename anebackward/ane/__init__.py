"""Apple Neural Engine dispatch (front end).

This build has no ANE shim yet: available() is False everywhere and says so.
The shim (csrc/ane, with an emulated platform for Linux) is its own issue.
"""
import sys

from ..errors import AneUnavailableError

_REASON = ("this build of anebackward has no ANE shim yet (csrc/ane is not built)"
           if sys.platform == "darwin" else
           f"the Apple Neural Engine exists only on Apple Silicon Macs; this is {sys.platform}")


def available():
    """True when kernels can run on the ANE in this process."""
    return False


def status():
    """Why the ANE is or is not usable, as a dict."""
    return {"available": False, "platform": sys.platform, "reason": _REASON}


def require():
    """Raise AneUnavailableError (with the reason) unless the ANE is usable."""
    if not available():
        raise AneUnavailableError(f"backend='ane' requested but the ANE is unavailable: {_REASON}; "
                                  "use backend='auto' (falls back to the CPU) or 'cpu'")


def routes(backend, kernel, **shape):
    """Whether a call of `kernel` with this resolved backend and shape runs on
    the ANE. Always False in this build ("ane" already raised in resolve)."""
    return False
