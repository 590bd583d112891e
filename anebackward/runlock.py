"""One writer per run directory: advisory locks (fcntl.flock) held for a
trainer's life and released by the OS when the process dies.

Two kinds of lock file, both holding the holder's pid:
  DIR/.lock           inside a run directory (a new run's staging directory
                      takes it before writing anything; it moves with the
                      directory when the run is published as --out)
  PARENT/.NAME.lock   beside --out, for the name: taken before --out exists,
                      so two trainers racing for the same new --out are
                      serialized (the second is refused)
A lock file is unlinked by its holder when it releases it; an acquirer
checks that the file it locked is still the one at the path (else it
retries), so the unlink cannot let two holders in.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time

LOCK = ".lock"


class RunInUse(ValueError):
    """Another live process holds the lock of a run directory."""

    def __init__(self, message, pid):
        super().__init__(message)
        self.pid = pid


def name_lock_path(d):
    """PARENT/.NAME.lock of directory path d (symlinks in it resolved)."""
    real = os.path.realpath(d)
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.lock")


def _holder(fd):
    """The pid written in a lock file (None if it is not written yet)."""
    for _ in range(20):     # the holder writes it right after locking
        try:
            raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        if raw.isdigit():
            return int(raw)
        time.sleep(0.01)
    return None


class Lock:
    """An exclusive flock on `path` (created if needed, never through a
    symlink); RunInUse(what ...) naming the holder's pid if another process
    holds it."""

    def __init__(self, path, what):
        self.path, self.fd = path, None
        for _ in range(100):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                pid = _holder(fd)
                os.close(fd)
                who = f"pid {pid}" if pid else "a process that has not written its pid yet"
                raise RunInUse(f"{what} is in use by another trainer ({who}; lock file {path}): "
                               "wait for it to finish or stop it, or use another --out",
                               pid) from None
            if self._same(fd):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return
            os.close(fd)      # unlinked (released) between our open and our flock: again
        raise OSError(errno.EAGAIN, f"cannot take the lock {path}: it keeps being replaced")

    def _same(self, fd):
        try:
            a, b = os.fstat(fd), os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def moved(self, path):
        """The locked file is now at path (its directory was renamed)."""
        self.path = path

    def release(self):
        if self.fd is None:
            return
        try:
            if self._same(self.fd):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def is_locked(d):
    """True if a live process holds DIR/.lock of directory d."""
    path = os.path.join(d, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


class Locks:
    """The locks a trainer holds, released together (a context manager)."""

    def __init__(self):
        self.held = []
        self.made_dirs = []     # directories created for a lock: removed if left empty

    def take(self, path, what):
        lock = Lock(path, what)
        self.held.append(lock)
        return lock

    def holds(self, path):
        return any(lk.fd is not None and lk.path == path and lk._same(lk.fd) for lk in self.held)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for lock in reversed(self.held):
            lock.release()
        self.held = []
        for d in reversed(self.made_dirs):
            try:
                os.rmdir(d)
            except OSError:
                pass
