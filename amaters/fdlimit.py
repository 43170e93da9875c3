"""The open-file limit: raised to its hard limit at start, and checked against the configuration.

Every connection, listening socket, log file and storage file is a file descriptor.  The usual soft
limit (1,024) is far below what the connection caps allow, and a server that runs out of
descriptors cannot accept anything, health probes included.  So:

- :func:`raise_open_file_limit` raises the soft ``RLIMIT_NOFILE`` to the hard limit when the server
  starts (an unprivileged process may always do that);
- :func:`file_handle_problems` refuses (at configuration load, so on a reload too) a configuration
  whose connection caps (native protocol, ops site, gRPC when configured) plus the storage engine's
  open files plus :data:`RESERVED_HANDLES` exceed the hard limit.  That reserve covers listening
  sockets, log and audit files, thread-pool pipes and certificate reads; connection caps are
  enforced before anything else is done with a connection, so a flood of connections leaves it
  untouched and probes keep answering.
"""

from __future__ import annotations

import resource
from typing import Any

#: Descriptors kept for everything that is not a client connection or a storage file.
RESERVED_HANDLES = 128
#: Storage files besides the SST files RocksDB keeps open (WAL, MANIFEST, LOG, LOCK, directories).
STORAGE_BASE_HANDLES = 32
#: Soft limit aimed for when the hard limit is unlimited (Linux refuses more than fs.nr_open).
_UNLIMITED_TARGET = 1024 * 1024


def open_file_limits() -> tuple[int, int]:
    """(soft, hard) ``RLIMIT_NOFILE``; ``resource.RLIM_INFINITY`` stands for unlimited."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft open-file limit as far as the hard limit allows; returns (before, after)."""
    soft, hard = open_file_limits()
    target = hard if hard != resource.RLIM_INFINITY else _UNLIMITED_TARGET
    if soft != resource.RLIM_INFINITY and soft < target:
        for candidate in (target, 65536, 4096):
            if candidate <= soft:
                break
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (candidate, hard))
            except (ValueError, OSError):
                continue
            return soft, candidate
    return soft, soft


def handles_needed(config: Any) -> list[tuple[str, int]]:
    """What the configuration may hold open, as (what, count); a cap of 0 (no limit) is None."""
    parts: list[tuple[str, int]] = [("limits.max_connections", config.limits.max_connections)]
    if config.web.enabled:
        parts.append(("web.max_connections", config.web.max_connections))
    grpc = getattr(config, "grpc", None)
    if grpc is not None and getattr(grpc, "enabled", False):
        parts.append(("grpc.max_connections", grpc.max_connections))
    if config.storage.backend == "rocksdb":
        parts.append(("storage.max_open_files", config.storage.max_open_files + STORAGE_BASE_HANDLES))
    parts.append(("reserve", RESERVED_HANDLES))
    return parts


def file_handle_problems(config: Any, hard_limit: int | None = None) -> list[str]:
    """One line per way ``config`` could run the process out of file descriptors (empty: fine)."""
    hard = open_file_limits()[1] if hard_limit is None else hard_limit
    if hard == resource.RLIM_INFINITY:
        return []
    parts = handles_needed(config)
    unbounded = [name for name, count in parts if count == 0 and name != "reserve"]
    if unbounded:
        return [
            f"{name}: 0 (no limit) would let connections use up the open-file limit ({hard}); set a limit"
            for name in unbounded
        ]
    total = sum(count for _, count in parts)
    if total <= hard:
        return []
    detail = " + ".join(f"{name} {count}" for name, count in parts)
    return [
        f"limits.max_connections: connections and storage may need {total} file descriptors ({detail}),"
        f" more than the open-file limit of {hard} (ulimit -Hn); lower the connection caps or raise"
        " the hard limit (LimitNOFILE= in a systemd unit)"
    ]


__all__ = [
    "RESERVED_HANDLES",
    "file_handle_problems",
    "handles_needed",
    "open_file_limits",
    "raise_open_file_limit",
]
