"""Atomic file writes: a reader sees the old file or the whole new one, never
half of it (checkpoints, optimizer state, tokenizer)."""
from __future__ import annotations

import os
import uuid
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file) on a temporary file beside path, then rename it over
    path; on any error the temporary file is removed and path is untouched."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    # like mkstemp, but with the umask's permissions (mkstemp would make it 0600)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
