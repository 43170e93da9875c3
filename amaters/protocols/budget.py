"""The process-wide memory budget for request bytes received and not yet handled.

Every native-protocol connection charges the bytes it holds (a partial frame, or frames waiting
while it is paused) to one :class:`ReceiveBudget`; connections that have not logged in yet also
count against a smaller pre-login share.  A connection whose bytes push a total past its limit is
refused (the protocol answers SERVER_OVERLOADED and closes it, dropping its buffer at once), so any
number of slow senders together hold at most ``limits.max_buffered_bytes`` (plus one socket read
each), and unauthenticated ones at most ``limits.max_unauthenticated_bytes``.

Freed buffers go back to the allocator, which does not always give the memory back to the
operating system (large frames arrive as many 64 KiB reads, which fragment the heap).  After the
total falls from a high-water mark above :data:`TRIM_AFTER_BYTES` to a quarter of it, the budget
asks the C library to return free memory (``malloc_trim``, glibc only), at most once per
:data:`TRIM_INTERVAL` seconds, so that memory taken by a burst of large frames does not stay with
the process after they are gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

if TYPE_CHECKING:
    from amaters.config import LimitsConfig

#: Total buffered bytes above which a later drop asks the allocator to return memory.
TRIM_AFTER_BYTES = 16 * 1024 * 1024
#: Least seconds between two such requests.
TRIM_INTERVAL = 1.0


def _libc_malloc_trim() -> Callable[[], None] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def malloc_trim() -> None:
        trim(0)

    return malloc_trim


_MALLOC_TRIM = _libc_malloc_trim()


class ReceiveBudget:
    """Bytes held by all connections, in total and by unauthenticated ones."""

    _log = Logger()

    def __init__(
        self, limits: LimitsConfig, clock: Any, trim: Callable[[], None] | None = _MALLOC_TRIM
    ) -> None:
        self.limits = limits
        self.clock = clock
        self.total = 0
        self.unauthenticated = 0
        #: Connections refused because a total was used up (for metrics and tests).
        self.refused = 0
        self.trims = 0
        self._trim = trim
        self._high_water = 0
        self._trim_call: Any = None

    def charge(self, delta: int, authenticated: bool) -> None:
        """Add ``delta`` bytes (negative: released) held by a connection."""
        total = self.total + delta
        self.total = total
        if not authenticated:
            self.unauthenticated += delta
        if total > self._high_water:
            self._high_water = total
        elif self._high_water > TRIM_AFTER_BYTES and total <= self._high_water // 4:
            self._schedule_trim()

    def move_to_authenticated(self, held: int) -> None:
        """A connection holding ``held`` bytes has logged in."""
        self.unauthenticated -= held

    def over(self, authenticated: bool) -> str | None:
        """The setting whose limit is passed (None: within budget)."""
        limits = self.limits
        if self.total > limits.max_buffered_bytes:
            return "limits.max_buffered_bytes"
        if not authenticated and self.unauthenticated > limits.max_unauthenticated_bytes:
            return "limits.max_unauthenticated_bytes"
        return None

    def _schedule_trim(self) -> None:
        self._high_water = self.total
        if self._trim is None or self._trim_call is not None:
            return
        self._trim_call = self.clock.callLater(TRIM_INTERVAL, self._run_trim)

    def _run_trim(self) -> None:
        self._trim_call = None
        trim = self._trim
        if trim is None:
            return
        try:
            trim()
            self.trims += 1
        except Exception:
            self._log.failure("Returning free memory to the system failed")

    def stop(self) -> None:
        """Cancel a pending trim (the server is stopping)."""
        call, self._trim_call = self._trim_call, None
        if call is not None and call.active():
            call.cancel()


__all__ = ["ReceiveBudget"]
