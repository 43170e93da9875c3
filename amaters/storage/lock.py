"""The data-directory lock: one server per ``data_dir``.

Two servers writing one RocksDB directory would corrupt it.  RocksDB refuses a second open with its
own ``LOCK`` file, but its message ("lock hold by current process ... No locks available" or
"Resource temporarily unavailable") does not tell an operator what to do.  :class:`DataDirLock`
takes an exclusive ``flock`` on ``<data_dir>/LOCK`` first and, if another process holds it, fails
with :class:`DataDirLocked` naming the directory and the holder's pid.

``flock`` locks belong to the open file: the kernel releases them when the holder exits, even on
``kill -9``, so a stale ``LOCK`` file never blocks a restart.  The file itself is never deleted
(deleting it would let two processes lock two different inodes of the same name).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from amaters.errors import ErrorCategory, StorageError

LOCK_FILE_NAME = "LOCK"


class DataDirLocked(StorageError):
    """Another process (or another backend in this one) holds the data directory's lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message, category=ErrorCategory.SERVER_ERROR)


class DataDirLock:
    """An exclusive, non-blocking lock on ``<data_dir>/LOCK`` holding the owner's pid."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (blocking file I/O: call it from a pool thread).

        Raises :class:`DataDirLocked` when another holder has it, ``StorageError`` when the
        directory cannot be created or the file cannot be opened.
        """
        if self._fd is not None:
            return
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StorageError(
                f"cannot create the lock file {str(self.path)!r}: {e.strerror}",
                category=ErrorCategory.SERVER_ERROR,
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"process {holder}" if holder else "another process"
                raise DataDirLocked(
                    f"data directory {str(self.data_dir)!r} is in use by {who} (lock file"
                    f" {str(self.path)!r}); stop that server first, or give this one another"
                    " server.data_dir"
                ) from None
            raise StorageError(
                f"cannot lock {str(self.path)!r}: {e.strerror}", category=ErrorCategory.SERVER_ERROR
            ) from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only a hint for the message above
        self._fd = fd

    def release(self) -> None:
        """Drop the lock.  Safe to call when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
