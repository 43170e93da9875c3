"""The audit log: line format, field allow-list, batching on the clock, size rotation, failures."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from amaters.auth.audit import FIELDS, AuditLog, AuditService, NullAuditSink, audit_event, rfc3339
from amaters.config import AuditConfig
from amaters.interfaces import IAuditSink

NOW = 1_750_000_000.25
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def denial(n: int = 0) -> dict[str, Any]:
    return audit_event(
        "authorization",
        "denied",
        principal=f"user{n}",
        auth_method="jwt",
        action="set",
        resource="collection:orders",
        source="127.0.0.1:5000",
        error="AUTH_INSUFFICIENT_PERMISSIONS: ...",
    )


def test_sinks_provide_the_interface(tmp_path: Path) -> None:
    """AuditLog, the null sink and the audit service all provide IAuditSink."""
    assert verifyObject(IAuditSink, AuditLog(tmp_path / "a.log", 10_000, 2, clock()))
    assert verifyObject(IAuditSink, NullAuditSink())
    assert verifyObject(IAuditSink, AuditService(AuditConfig(), tmp_path, clock()))


def test_a_line_has_exactly_the_audit_fields(tmp_path: Path) -> None:
    """Each event is one JSON object with exactly the audit fields, an id and an RFC 3339 UTC time."""
    log = AuditLog(tmp_path / "audit.log", 10_000, 2, clock())
    log.open()
    log.emit(denial())
    log.emit(audit_event("authentication", "success", principal="bob"))
    log.close()
    first, second = lines_of(tmp_path / "audit.log")
    assert list(first) == list(FIELDS)
    assert first["timestamp"] == rfc3339(NOW) == "2025-06-15T15:06:40.250Z"
    assert RFC3339_UTC.fullmatch(second["timestamp"])
    assert first["id"] != second["id"] and len(first["id"]) == 32
    assert first["event_type"] == "authorization" and first["result"] == "denied"
    assert first["resource"] == "collection:orders" and first["source"] == "127.0.0.1:5000"
    assert second["action"] is None and second["error"] is None


def test_fields_outside_the_allow_list_never_reach_the_file(tmp_path: Path) -> None:
    """Extra fields (a token, a value, a key) are dropped, so they cannot leak into the audit log."""
    log = AuditLog(tmp_path / "audit.log", 10_000, 2, clock())
    log.open()
    event = dict(denial(), token="eyJhbGciOiJIUzI1NiJ9.secret-token", value="plaintext!", key=b"k1")
    log.emit(event)
    log.close()
    text = (tmp_path / "audit.log").read_text()
    for secret in ("secret-token", "plaintext!", "k1"):
        assert secret not in text


def test_unknown_event_types_and_results_are_normalized(tmp_path: Path) -> None:
    """An event_type or result outside the documented sets is recorded as a security violation/failure."""
    log = AuditLog(tmp_path / "audit.log", 10_000, 2, clock())
    log.open()
    log.emit({"event_type": "whatever", "result": "maybe"})
    log.close()
    (line,) = lines_of(tmp_path / "audit.log")
    assert (line["event_type"], line["result"]) == ("security_violation", "failure")


def test_control_characters_and_long_fields_stay_on_one_bounded_line(tmp_path: Path) -> None:
    """Newlines in a field are escaped (one event, one line) and fields are cut at 1024 characters."""
    log = AuditLog(tmp_path / "audit.log", 100_000, 2, clock())
    log.open()
    log.emit(audit_event("authentication", "failure", principal='evil\n{"forged": true}', error="x" * 5000))
    log.close()
    (line,) = lines_of(tmp_path / "audit.log")
    assert line["principal"] == 'evil\\x0a{"forged": true}'
    assert len(line["error"]) == 1024


def test_events_are_written_on_the_next_reactor_turn_in_one_batch(tmp_path: Path) -> None:
    """emit() queues; the queue is written when the clock turns (one timer for a burst), or on flush."""
    c = clock()
    log = AuditLog(tmp_path / "audit.log", 100_000, 2, c)
    log.open()
    for n in range(5):
        log.emit(denial(n))
    assert (tmp_path / "audit.log").read_text() == ""
    assert len(c.getDelayedCalls()) == 1
    c.advance(0)
    assert len(lines_of(tmp_path / "audit.log")) == 5
    assert c.getDelayedCalls() == []
    log.emit(denial())
    log.flush()
    assert len(lines_of(tmp_path / "audit.log")) == 6 and c.getDelayedCalls() == []
    log.close()


def test_events_before_open_are_kept(tmp_path: Path) -> None:
    """Events emitted before the log opens are written when it opens."""
    log = AuditLog(tmp_path / "sub" / "audit.log", 100_000, 2, clock())
    log.emit(denial())
    log.open()
    log.close()
    assert len(lines_of(tmp_path / "sub" / "audit.log")) == 1


def test_file_is_private(tmp_path: Path) -> None:
    """The audit log is created with mode 0600."""
    log = AuditLog(tmp_path / "audit.log", 100_000, 2, clock())
    log.open()
    log.close()
    assert stat.S_IMODE(os.stat(tmp_path / "audit.log").st_mode) == 0o600


@pytest.mark.parametrize("max_files", [2, 3, 5])
def test_rotation_keeps_at_most_max_files_of_whole_lines(tmp_path: Path, max_files: int) -> None:
    """Rotated by size: never more than max_files files, each within max_bytes, every line whole."""
    c = clock()
    max_bytes = 2048
    log = AuditLog(tmp_path / "audit.log", max_bytes, max_files, c)
    log.open()
    for n in range(400):
        log.emit(denial(n))
        if n % 7 == 0:
            c.advance(0)
    log.close()
    files = log.files()
    assert len(files) == max_files
    assert len(list(tmp_path.iterdir())) == max_files
    seen = []
    for path in reversed(files):  # oldest first
        assert path.stat().st_size <= max_bytes
        seen += [line["principal"] for line in lines_of(path)]
    numbers = [int(p[4:]) for p in seen]
    assert numbers == list(range(numbers[0], 400))  # the newest events, in order, none lost between files


def test_write_failures_are_logged_not_raised(tmp_path: Path) -> None:
    """A failing write (disk full) drops the events, counts them and logs once; emit never raises."""

    class FullDisk:
        size = 0

        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    c = clock()
    log = AuditLog(tmp_path / "audit.log", 100_000, 2, c)
    log.open()
    log._file.close()
    log._file = FullDisk()
    logged: list[LogEvent] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        for _ in range(3):
            log.emit(denial())
            log.flush()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert log.dropped == 3
    assert len([e for e in logged if "audit log" in e.get("log_format", "")]) == 1


def test_service_opens_on_start_and_closes_on_stop(tmp_path: Path) -> None:
    """The audit service opens <data_dir>/audit.log when it starts and writes everything on stop."""
    c = clock()
    audit = AuditService(AuditConfig(enabled=True), tmp_path, c)
    audit.emit(denial())
    audit.startService()
    audit.emit(denial(1))
    audit.stopService()
    assert len(lines_of(tmp_path / "audit.log")) == 2
    assert c.getDelayedCalls() == []


def test_disabled_service_discards_events(tmp_path: Path) -> None:
    """With audit.enabled = false nothing is written and no file is created."""
    audit = AuditService(AuditConfig(enabled=False), tmp_path, clock())
    audit.startService()
    audit.emit(denial())
    audit.stopService()
    assert not audit.enabled and list(tmp_path.iterdir()) == []


def test_reconfigure_moves_and_toggles_the_log(tmp_path: Path) -> None:
    """A reload may move the log, change rotation, or turn auditing off and on again."""
    c = clock()
    audit = AuditService(AuditConfig(enabled=True, path=str(tmp_path / "a.log")), tmp_path, c)
    audit.startService()
    audit.emit(denial(1))
    audit.reconfigure(AuditConfig(enabled=True, path=str(tmp_path / "b.log")))
    audit.emit(denial(2))
    audit.reconfigure(AuditConfig(enabled=False))
    audit.emit(denial(3))
    audit.reconfigure(AuditConfig(enabled=True, path=str(tmp_path / "b.log"), max_files=3))
    audit.emit(denial(4))
    audit.stopService()
    assert [e["principal"] for e in lines_of(tmp_path / "a.log")] == ["user1"]
    assert [e["principal"] for e in lines_of(tmp_path / "b.log")] == ["user2", "user4"]


def test_control_characters_in_audit_fields_are_escaped() -> None:
    """A token subject carrying ESC and a newline is written with visible escapes, so the decoded
    field printed to a terminal is harmless."""
    import json

    from twisted.internet.task import Clock

    from amaters.auth.audit import audit_event, format_event

    line = format_event(audit_event("authentication", "failure", principal="mal\x1b[2J\nory"), Clock())
    record = json.loads(line)
    assert record["principal"] == "mal\\x1b[2J\\x0aory"
