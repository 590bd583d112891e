"""File I/O of run directories and checkpoints: atomic writes (a reader sees
the old file or the whole new one, never half of it), an append-only log,
and reads that refuse anything but a regular file.

Every OSError raised here names the path it concerns (a write that fails
with ENOSPC carries no file name of its own)."""
from __future__ import annotations

import os
import stat
import uuid
from typing import BinaryIO, Callable


def _named(e: OSError, path: str) -> OSError:
    """e with path as its file name if it had none."""
    if e.filename is None and e.errno is not None:
        return OSError(e.errno, e.strerror or str(e), path)
    return e


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file) on a temporary file beside path, then rename it over
    path; on any error the temporary file is removed and path is untouched.
    The temporary file is created new (O_EXCL), never through a symlink
    (O_NOFOLLOW)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    # like mkstemp, but with the umask's permissions (mkstemp would make it 0600)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o666)
    except OSError as e:
        raise _named(e, tmp) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _named(e, path) from None
        raise


class _Appender:
    """A text file opened for appending whose OSErrors name it."""

    def __init__(self, path):
        self.path = path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise _named(e, path) from None
        self._f = os.fdopen(fd, "a", encoding="utf-8")

    def _do(self, fn, *a):
        try:
            return fn(*a)
        except OSError as e:
            raise _named(e, self.path) from None

    def write(self, text):
        return self._do(self._f.write, text)

    def flush(self):
        return self._do(self._f.flush)

    def close(self):
        return self._do(self._f.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.close()
        except OSError:
            if exc[0] is None:
                raise


def open_append(path: str | os.PathLike) -> _Appender:
    """An existing file, opened for appending text (not through a symlink)."""
    return _Appender(os.fspath(path))


def open_regular(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """path opened for binary reading if it is a regular file; a FIFO, a
    device (/dev/zero) or a directory is an OSError naming it, raised
    without blocking or reading."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _named(e, path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise OSError(22, f"the {what} must be a regular file, this is {kind}", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
