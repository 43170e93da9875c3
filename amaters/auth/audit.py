"""The audit log: one JSON object per line, rotated by size, never holding secrets or values.

Each line has exactly these fields (absent ones are null)::

    {"id": "0f8c...", "timestamp": "2025-06-01T12:00:00.123Z", "event_type": "authorization",
     "result": "denied", "principal": "alice", "auth_method": "jwt", "action": "set",
     "resource": "collection:orders", "source": "10.0.0.7:51234",
     "error": "AUTH_INSUFFICIENT_PERMISSIONS: ..."}

``event_type`` is one of authentication, authorization, admin, config_change, security_violation;
``result`` one of success, failure, denied.  :class:`AuditLog` keeps only these fields, as
strings of bounded length, so a caller cannot put a token or a value in the file by accident.

Writing: :meth:`AuditLog.emit` formats the line and queues it; the queue is written with one append
on the next reactor turn (so a burst of events costs one write), immediately when it grows large,
and on stop.  Rotation is by size with :class:`twisted.python.logfile.LogFile`: ``audit.log`` is
current, ``audit.log.1`` the newest rotated file, at most ``max_files`` files in all; a rotation
happens between lines, never inside one.  The file is created with mode 0600.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.logfile import LogFile
from zope.interface import implementer

from amaters.config import AuditConfig
from amaters.interfaces import IAuditSink
from amaters.ops.logging import escape_control

EVENT_TYPES = ("authentication", "authorization", "admin", "config_change", "security_violation")
RESULTS = ("success", "failure", "denied")
FIELDS = (
    "id",
    "timestamp",
    "event_type",
    "result",
    "principal",
    "auth_method",
    "action",
    "resource",
    "source",
    "error",
)

#: Longest text kept in one field.
MAX_FIELD_CHARS = 1024

#: Lines queued before they are written without waiting for the next reactor turn.
MAX_QUEUED_LINES = 1000

#: Seconds between two log messages about failing audit writes.
ERROR_LOG_INTERVAL = 60.0


def audit_event(
    event_type: str,
    result: str,
    *,
    principal: str | None = None,
    auth_method: str | None = None,
    action: str | None = None,
    resource: str | None = None,
    source: str | None = None,
    error: str | None = None,
) -> dict[str, str | None]:
    """An audit event (``id`` and ``timestamp`` are added when it is emitted)."""
    return {
        "event_type": event_type,
        "result": result,
        "principal": principal,
        "auth_method": auth_method,
        "action": action,
        "resource": resource,
        "source": source,
        "error": error,
    }


def rfc3339(seconds: float) -> str:
    """``seconds`` since the epoch as RFC 3339 UTC with milliseconds, e.g. 2025-06-01T12:00:00.123Z."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: Any) -> str | None:
    """A bounded field value whose control characters are visible escapes (``\\x1b``): fields name
    things a client chose (token subjects, collection names), and a decoded audit line printed to a
    terminal must not carry escape sequences or forged line breaks."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return escape_control(text[:MAX_FIELD_CHARS])[:MAX_FIELD_CHARS]


def format_event(
    event: Mapping[str, Any], clock: IReactorTime, new_id: Callable[[], str] = lambda: uuid.uuid4().hex
) -> str:
    """The JSON line for ``event``: only the audit fields, as bounded strings, ending in a newline."""
    record: dict[str, str | None] = {name: _text(event.get(name)) for name in FIELDS}
    if record["id"] is None:
        record["id"] = new_id()
    if record["timestamp"] is None:
        record["timestamp"] = rfc3339(clock.seconds())
    if record["event_type"] not in EVENT_TYPES:
        record["event_type"] = "security_violation"
    if record["result"] not in RESULTS:
        record["result"] = "failure"
    # ensure_ascii: one line whatever the input (no raw newlines or control characters).
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"


@implementer(IAuditSink)
class NullAuditSink:
    """Audit disabled: events go nowhere."""

    def emit(self, event: object) -> None:
        return None


@implementer(IAuditSink)
class AuditLog:
    """JSON lines appended to ``path``, rotated at ``max_bytes``, at most ``max_files`` files.

    Nothing is opened until :meth:`open`; events emitted before are queued.  ``emit`` never raises:
    a failing write is logged (at most once a minute) and its lines are dropped and counted in
    ``dropped``.
    """

    _log = Logger()

    def __init__(self, path: str | Path, max_bytes: int, max_files: int, clock: IReactorTime) -> None:
        if max_files < 2:
            raise ValueError("max_files counts the current file too: at least 2")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.clock = clock
        self.dropped = 0
        self._queue: list[bytes] = []
        self._file: Any = None
        self._timer: IDelayedCall | None = None
        self._last_error_logged: float | None = None

    @property
    def is_open(self) -> bool:
        """Whether the file is open (events are queued until it is)."""
        return self._file is not None

    def open(self) -> None:
        """Create the directory (0700) and open the file (0600) for appending; write what is queued."""
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._file = LogFile(
            self.path.name,
            str(self.path.parent),
            rotateLength=None,  # rotation is ours, between lines: see _write
            defaultMode=0o600,
            maxRotatedFiles=self.max_files - 1,
        )
        self.flush()

    def close(self) -> None:
        """Write what is queued and close the file."""
        self.flush()
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                self._log.failure("Closing the audit log {path} failed", path=str(self.path))

    def emit(self, event: object) -> None:
        try:
            if not isinstance(event, Mapping):
                raise TypeError(f"an audit event is a mapping, not {type(event).__name__}")
            line = format_event(event, self.clock).encode("ascii")
        except Exception:
            self._log.failure("Dropping an audit event that cannot be formatted")
            self.dropped += 1
            return
        self._queue.append(line)
        if len(self._queue) >= MAX_QUEUED_LINES:
            self.flush()
        elif self._timer is None and self._file is not None:
            self._timer = self.clock.callLater(0, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write every queued line now (a no-op while the log is closed)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._file is None or not self._queue:
            return
        lines, self._queue = self._queue, []
        try:
            self._write(lines)
        except OSError as e:
            self.dropped += len(lines)
            now = self.clock.seconds()
            if self._last_error_logged is None or now - self._last_error_logged >= ERROR_LOG_INTERVAL:
                self._last_error_logged = now
                self._log.error(
                    "Writing the audit log {path} failed ({error}); {dropped} event(s) dropped so far",
                    path=str(self.path),
                    error=e.strerror or type(e).__name__,
                    dropped=self.dropped,
                )

    def _write(self, lines: list[bytes]) -> None:
        file = self._file
        chunk = bytearray()
        for line in lines:
            if (chunk or file.size) and file.size + len(chunk) + len(line) > self.max_bytes:
                if chunk:
                    file.write(bytes(chunk))
                    chunk.clear()
                file.rotate()
            chunk += line
        if chunk:
            file.write(bytes(chunk))

    def files(self) -> list[Path]:
        """The current file and the rotated ones that exist, newest first."""
        found = [self.path] if self.path.exists() else []
        index = 1
        while (candidate := self.path.with_name(f"{self.path.name}.{index}")).exists():
            found.append(candidate)
            index += 1
        return found


def audit_path(settings: AuditConfig, data_dir: Path) -> Path:
    """Where the audit log goes: ``audit.path``, or ``<data_dir>/audit.log``."""
    return Path(settings.path) if settings.path else data_dir / "audit.log"


@implementer(IAuditSink)
class AuditService(service.Service):
    """The ``audit`` service: the audit sink everyone emits to (``root.audit``).

    Opens the log when it starts and closes it (after writing what is queued) when it stops.
    :meth:`reconfigure` applies reloaded ``[audit]`` settings.  With ``audit.enabled = false``
    events are discarded.
    """

    name = "audit"
    _log = Logger()

    def __init__(self, settings: AuditConfig, data_dir: Path, clock: IReactorTime) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.clock = clock
        self.sink: NullAuditSink | AuditLog = self._build(settings)

    def _build(self, settings: AuditConfig) -> NullAuditSink | AuditLog:
        if not settings.enabled:
            return NullAuditSink()
        return AuditLog(
            audit_path(settings, self.data_dir), settings.max_bytes, settings.max_files, self.clock
        )

    @property
    def enabled(self) -> bool:
        """Whether events are written (``audit.enabled``)."""
        return isinstance(self.sink, AuditLog)

    def emit(self, event: object) -> None:
        self.sink.emit(event)

    def flush(self) -> None:
        """Write queued events now (tests and shutdown; normally the next reactor turn does it)."""
        if isinstance(self.sink, AuditLog):
            self.sink.flush()

    def startService(self) -> None:
        super().startService()
        if isinstance(self.sink, AuditLog):
            self.sink.open()
            self._log.info("Audit log {path}", path=str(self.sink.path))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if isinstance(self.sink, AuditLog):
            self.sink.close()
        return defer.succeed(None)

    def reconfigure(self, settings: AuditConfig) -> None:
        """Use new ``[audit]`` settings: a new file, rotation limits, or on/off."""
        if settings == self.settings:
            return
        old, new = self.sink, self._build(settings)
        # Close first: the new log may be the same file, and must append after the old one's lines.
        if isinstance(old, AuditLog):
            old.close()
        self.sink, self.settings = new, settings
        if self.running and isinstance(new, AuditLog):
            new.open()


__all__ = [
    "EVENT_TYPES",
    "FIELDS",
    "RESULTS",
    "AuditLog",
    "AuditService",
    "NullAuditSink",
    "audit_event",
    "audit_path",
    "format_event",
    "rfc3339",
]
