"""How many fsyncs per second the disk under a directory sustains: the physical limit for durable writes.

A write acknowledged after ``fdatasync`` cannot complete faster than one fsync, so one writer waiting
for each of its writes is capped at this rate; group commit (many writers sharing one fsync) is how a
server goes beyond it.  The probe appends 4 KiB records to a scratch file and ``fdatasync``s after
each one, like a write-ahead log, bounded by a duration and a count.

``python -m bench fsync --dir DIR [--seconds 2]`` prints the result.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class FsyncRate:
    directory: str
    fsyncs: int
    seconds: float
    fsyncs_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    directory: str | Path, seconds: float = 2.0, max_fsyncs: int = 100_000, record: int = 4096
) -> FsyncRate:
    """Append ``record`` bytes and fdatasync, repeatedly, for ``seconds`` or ``max_fsyncs`` times."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(record)
    durations: list[float] = []
    fd, name = tempfile.mkstemp(prefix="fsync-probe-", dir=directory)
    try:
        started = time.perf_counter()
        deadline = started + seconds
        while len(durations) < max_fsyncs:
            before = time.perf_counter()
            if before >= deadline:
                break
            os.write(fd, payload)
            os.fdatasync(fd)
            durations.append(time.perf_counter() - before)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        os.unlink(name)
    durations.sort()
    count = len(durations)
    return FsyncRate(
        directory=str(directory),
        fsyncs=count,
        seconds=round(elapsed, 3),
        fsyncs_per_s=round(count / elapsed, 1),
        p50_ms=round(durations[count // 2] * 1000, 3),
        p99_ms=round(durations[min(count - 1, int(count * 0.99))] * 1000, 3),
        max_ms=round(durations[-1] * 1000, 3),
    )
