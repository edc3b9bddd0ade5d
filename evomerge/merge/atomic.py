"""Atomic file writes: a reader sees the old content or the new, never a mix; a full disk leaves the old intact."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from evomerge.errors import EvomergeError


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a mix."""
    write_atomic_bytes(path, text.encode())


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync it, rename it over `path`, fsync the folder. On
    failure (a full disk, say) the temporary file is removed and `path` keeps its old content."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it 0600; a run's files follow the umask like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and disk_full(e):
            raise EvomergeError(f"the disk is full: could not write {path} ({e.strerror}); its previous content "
                                "is intact", "free some space and run the command again") from e
        raise


def umask() -> int:
    mask = os.umask(0o022)  # read it (there is no getter) and put it back
    os.umask(mask)
    return mask


def disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
