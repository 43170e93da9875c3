"""Log output: JSON and text lines, the level filter and its runtime change, size and daily rotation,
taking over twistd's observers, and the access log / slow-request stage."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.logger import (
    FileLogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
)

from amaters.config import Config, LoggingConfig, load_config
from amaters.ops.logging import (
    LogController,
    LoggingService,
    PrunedDailyLogFile,
    format_json,
)
from amaters.ops.stages import ACCESS_LOG_NAMESPACE, AccessLogStage
from amaters.protocols.server import ANONYMOUS
from amaters.query import operations as ops
from amaters.query.pipeline import RequestContext
from amaters.types import CipherBlob


def settings(**changes: Any) -> LoggingConfig:
    return attrs.evolve(LoggingConfig(), **changes)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# -- formats ---------------------------------------------------------------------------------------


def test_json_lines_parse_and_carry_named_fields(tmp_path: Path) -> None:
    """With format json every line is one JSON object with time, level, namespace, the formatted
    message and each named field of the event."""
    path = tmp_path / "server.log"
    publisher = LogPublisher()
    controller = LogController(settings(format="json", file=str(path)), publisher)
    controller.install()
    log = Logger(namespace="amaters.test", observer=publisher)
    log.info("Accepted {client} as {principal}", client="amaters-py/0.1", principal="alice")
    log.warn("Disk at {percent}% for {collections}", percent=91.5, collections=["a", "b"])
    controller.uninstall()
    first, second = (json.loads(line) for line in lines(path))
    assert first["level"] == "info"
    assert first["namespace"] == "amaters.test"
    assert first["message"] == "Accepted amaters-py/0.1 as alice"
    assert (first["client"], first["principal"]) == ("amaters-py/0.1", "alice")
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["level"] == "warn" and second["percent"] == 91.5 and second["collections"] == ["a", "b"]


def test_json_failures_and_odd_values() -> None:
    """A logged failure adds error, error_type and traceback; non-JSON values become strings; a field
    named like a reserved key is prefixed."""
    events: list[LogEvent] = []
    log = Logger(namespace="amaters.test", observer=events.append)
    try:
        raise ValueError("bad thing")
    except ValueError:
        log.failure("Handling {what} failed", what=object.__name__, time=float("nan"), peer=object())
    record = json.loads(format_json(events[0]) or "")
    assert record["level"] == "critical"
    assert record["error"] == "bad thing" and record["error_type"] == "ValueError"
    assert "Traceback" in record["traceback"]
    assert record["field_time"] == "nan"
    assert record["peer"].startswith("<object object")
    assert record["message"] == "Handling object failed"


def test_text_format_is_twistds_classic_line(tmp_path: Path) -> None:
    """format text writes twistd's classic line: time, [namespace#level], message."""
    path = tmp_path / "server.log"
    publisher = LogPublisher()
    controller = LogController(settings(file=str(path)), publisher)
    controller.install()
    Logger(namespace="amaters.test", observer=publisher).info("Hello {who}", who="operator")
    controller.uninstall()
    (line,) = lines(path)
    assert "[amaters.test#info] Hello operator" in line


# -- level -----------------------------------------------------------------------------------------


def test_level_filter_and_runtime_change(tmp_path: Path) -> None:
    """At level warn, info and debug events are dropped; apply() lowers the level in place (as a
    SIGHUP reload does) and the next debug event is written."""
    path = tmp_path / "server.log"
    publisher = LogPublisher()
    controller = LogController(settings(level="warn", file=str(path)), publisher)
    controller.install()
    predicate = controller.predicate
    log = Logger(namespace="amaters.test", observer=publisher)
    log.debug("d1")
    log.info("i1")
    log.warn("w1")
    log.error("e1")
    assert not controller.enabled_for(LogLevel.info, "amaters.test")
    controller.apply(settings(level="debug", file=str(path)))
    assert controller.predicate is predicate
    assert controller.enabled_for(LogLevel.debug, ACCESS_LOG_NAMESPACE)
    log.debug("d2")
    controller.uninstall()
    messages = [line.split("] ", 1)[1] for line in lines(path)]
    assert messages == ["w1", "e1", "d2"]


def test_format_change_applies_to_the_next_event(tmp_path: Path) -> None:
    """Reloading format text -> json switches the format of the following lines."""
    path = tmp_path / "server.log"
    publisher = LogPublisher()
    controller = LogController(settings(file=str(path)), publisher)
    controller.install()
    log = Logger(namespace="amaters.test", observer=publisher)
    log.info("as text")
    controller.apply(settings(format="json", file=str(path)))
    log.info("as json")
    controller.uninstall()
    text, as_json = lines(path)
    assert text.endswith("as text")
    assert json.loads(as_json)["message"] == "as json"


# -- rotation --------------------------------------------------------------------------------------


def test_size_rotation_keeps_at_most_max_files(tmp_path: Path) -> None:
    """Writing far more than max_bytes rotates the file and keeps exactly max_files rotated files
    (server.log.1 .. .3) besides the current one."""
    path = tmp_path / "logs" / "server.log"
    publisher = LogPublisher()
    controller = LogController(settings(file=str(path), max_bytes=1024, max_files=3), publisher)
    controller.install()
    log = Logger(namespace="amaters.test", observer=publisher)
    for i in range(400):
        log.info("line {i} {padding}", i=i, padding="x" * 40)
    controller.uninstall()
    files = sorted(os.listdir(path.parent))
    assert files == ["server.log", "server.log.1", "server.log.2", "server.log.3"]
    for name in files:
        assert (path.parent / name).stat().st_size <= 1024 + 200
    assert lines(path)[-1].endswith("line 399 " + "x" * 40)
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)


def test_daily_rotation_prunes_old_days(tmp_path: Path) -> None:
    """A daily file rotates when the date changes and keeps at most max_files dated files."""
    day = 86400.0
    # Starts at the real time only because the new file's mtime (real) dates its first day.
    now = [time.time()]
    log_file = PrunedDailyLogFile("server.log", str(tmp_path), 2, clock=lambda: now[0])
    for i in range(5):
        log_file.write(f"day {i}\n")
        log_file.flush()
        now[0] += day
    log_file.write("today\n")
    log_file.close()
    names = sorted(os.listdir(tmp_path))
    dated = [n for n in names if n != "server.log"]
    assert len(dated) == 2, names
    assert (tmp_path / "server.log").read_text() == "today\n"
    assert [Path(p).read_text() for p in PrunedDailyLogFile.rotated_files(log_file)] == ["day 3\n", "day 4\n"]


def test_daily_rotation_through_the_controller(tmp_path: Path) -> None:
    """logging.rotate = daily opens a dated-rotation file for logging.file."""
    publisher = LogPublisher()
    controller = LogController(settings(file=str(tmp_path / "d.log"), rotate="daily"), publisher)
    controller.install()
    assert isinstance(controller.log_file, PrunedDailyLogFile)
    controller.uninstall()
    assert controller.log_file is None


# -- taking over twistd's observers ----------------------------------------------------------------


def test_takes_over_twistds_file_observer_and_gives_it_back() -> None:
    """With no logging.file, our format and level apply to the stream twistd's observer wrote to;
    other observers are left alone; uninstall gives twistd's observer back."""
    stream = io.StringIO()
    twistd_observer = FileLogObserver(stream, formatEventAsClassicLogText)
    other: list[LogEvent] = []
    publisher = LogPublisher(twistd_observer, other.append)
    controller = LogController(settings(format="json", level="info"), publisher)
    controller.install()
    assert controller.outputs == 1
    log = Logger(namespace="amaters.test", observer=publisher)
    log.debug("hidden")
    log.info("shown {n}", n=1)
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["shown 1"]
    assert [e["log_format"] for e in other] == ["hidden", "shown {n}"]
    controller.uninstall()
    log.info("after")
    assert stream.getvalue().splitlines()[-1].endswith("after")
    assert not stream.getvalue().splitlines()[-1].startswith("{")


def test_with_a_file_twistds_observer_is_silenced_until_stop(tmp_path: Path) -> None:
    """With logging.file, events go only to our file while installed."""
    stream = io.StringIO()
    publisher = LogPublisher(FileLogObserver(stream, formatEventAsClassicLogText))
    controller = LogController(settings(file=str(tmp_path / "s.log")), publisher)
    controller.install()
    Logger(namespace="amaters.test", observer=publisher).info("to the file")
    controller.uninstall()
    assert stream.getvalue() == ""
    assert lines(tmp_path / "s.log")[0].endswith("to the file")


def test_nothing_to_take_over_adds_nothing() -> None:
    """Embedded in a program with no file observers and no logging.file, nothing is added."""
    events: list[LogEvent] = []
    publisher = LogPublisher(events.append)
    controller = LogController(settings(), publisher)
    controller.install()
    assert controller.outputs == 0
    Logger(namespace="amaters.test", observer=publisher).debug("kept")
    controller.uninstall()
    assert len(events) == 1


# -- the service -----------------------------------------------------------------------------------


def test_service_installs_on_privileged_start_and_reports_unopenable_files(tmp_path: Path) -> None:
    """The logging service installs in privilegedStartService; a logging.file it cannot open fails
    startService with a message naming the setting."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    publisher = LogPublisher()
    ok = LoggingService(settings(file=str(tmp_path / "ok.log")), publisher)
    ok.privilegedStartService()
    assert ok.controller.installed
    ok.startService()
    ok.stopService()
    assert not ok.controller.installed
    bad = LoggingService(settings(file=str(blocker / "x.log")), publisher)
    bad.privilegedStartService()
    assert not bad.controller.installed
    with pytest.raises(OSError, match=r"logging\.file"):
        bad.startService()


def test_reload_prepares_level_and_format_changes() -> None:
    """prepare_reload returns a commit only when level, format or slow_request_ms changed; the
    commit applies them and tells the watchers (the access log)."""
    service = LoggingService(settings(), LogPublisher())
    old = load_config(None, [], {})
    assert service.prepare_reload(old, load_config(None, ["logging.file=x.log"], {})) is None
    seen: list[int] = []
    service.controller.watch(lambda s: seen.append(s.slow_request_ms))
    slower = service.prepare_reload(old, load_config(None, ["logging.slow_request_ms=5"], {}))
    assert slower is not None
    slower()
    assert seen == [5]
    new: Config = load_config(None, ["logging.level=debug", "logging.format=json"], {})
    commit = service.prepare_reload(old, new)
    assert commit is not None
    assert not service.controller.enabled_for(LogLevel.debug)
    commit()
    assert service.controller.enabled_for(LogLevel.debug)
    assert service.controller.settings.format == "json"


# -- access log and slow requests ------------------------------------------------------------------


def access_stage(
    events: list[LogEvent], clock: Clock, slow_ms: int = 1000, debug: bool = True
) -> AccessLogStage:
    stage = AccessLogStage(clock, slow_ms, lambda: debug)
    assert stage._log.namespace == ACCESS_LOG_NAMESPACE
    stage._log = Logger(namespace=ACCESS_LOG_NAMESPACE, observer=events.append)
    return stage


def test_access_log_event_per_request_without_keys_or_values() -> None:
    """Each request gives one debug event with op, collection, status, duration, principal and
    source, and neither the key nor the value."""
    events: list[LogEvent] = []
    clock = Clock()
    clock.advance(50)
    stage = access_stage(events, clock)
    ctx = RequestContext(7, ANONYMOUS, "10.0.0.1:4242", started=49.988)
    op = ops.Set("users", b"the-secret-key", CipherBlob.wrap(b"the-secret-value"))
    stage.after(ctx, op, None)
    (event,) = events
    assert event["log_level"] == LogLevel.debug
    assert event["log_namespace"] == ACCESS_LOG_NAMESPACE
    assert (event["op"], event["collection"], event["status"]) == ("set", "users", "ok")
    assert event["duration_ms"] == 12.0
    assert (event["principal"], event["source"], event["request_id"]) == ("anonymous", "10.0.0.1:4242", 7)
    text = json.dumps(json.loads(format_json(event) or ""))
    assert "the-secret" not in text and "the-secret" not in repr(event)


def test_access_log_skipped_when_debug_is_off_but_slow_requests_warn() -> None:
    """At level info no access event is built; a request over slow_request_ms still gives a warning
    with its error status."""
    from twisted.python.failure import Failure

    from amaters.errors import NotFound

    events: list[LogEvent] = []
    clock = Clock()
    clock.advance(10)
    stage = access_stage(events, clock, slow_ms=100, debug=False)
    stage.after(RequestContext(1, ANONYMOUS, started=9.95), ops.Get("c", b"k"), None)
    assert events == []
    stage.after(RequestContext(2, ANONYMOUS, started=9.5), ops.Get("c", b"k"), Failure(NotFound("gone")))
    (event,) = events
    assert event["log_level"] == LogLevel.warn
    assert (event["duration_ms"], event["threshold"], event["status"]) == (500.0, 100, "error")
    assert event["error_code"] == "STORAGE_NOT_FOUND"


def test_slow_request_warnings_off_at_zero() -> None:
    """logging.slow_request_ms = 0 never warns."""
    events: list[LogEvent] = []
    clock = Clock()
    clock.advance(100)
    stage = access_stage(events, clock, slow_ms=0, debug=False)
    stage.after(RequestContext(1, ANONYMOUS, started=1.0), ops.ListCollections(), None)
    assert events == []


def test_access_log_for_requests_answered_together() -> None:
    """after_many logs what after would for each request: nothing when none is slow and debug is
    off, a warning for each slow one, and with debug on an event for every request, in order."""
    events: list[LogEvent] = []
    clock = Clock()
    clock.advance(10)

    def items(*started: float) -> list[Any]:
        return [
            (RequestContext(n, ANONYMOUS, started=s), ops.Get("c", b"k"), None) for n, s in enumerate(started)
        ]

    quiet = access_stage(events, clock, slow_ms=100, debug=False)
    quiet.after_many(items(9.95, 9.99, 0.0))
    assert events == []
    quiet.after_many(items(9.95, 9.5, 0.0))
    (event,) = events
    assert (event["log_level"], event["request_id"], event["duration_ms"]) == (LogLevel.warn, 1, 500.0)

    events.clear()
    access_stage(events, clock, slow_ms=0, debug=False).after_many(items(1.0))
    assert events == []
    access_stage(events, clock, slow_ms=100, debug=True).after_many(items(9.95, 9.5, 9.99))
    assert [(e["log_level"], e["request_id"]) for e in events] == [
        (LogLevel.debug, 0),
        (LogLevel.warn, 1),
        (LogLevel.debug, 2),
    ]


def test_remembered_level_decisions_follow_level_changes(tmp_path: Path) -> None:
    """enabled_for remembers its answer, and forgets it whenever a level changes: by a reload
    (apply), per namespace on the predicate, or by clearing the namespace levels.  The access log's
    wiring (a partial over enabled_for) sees each change on the next request."""
    from functools import partial

    controller = LogController(settings(level="info", file=str(tmp_path / "server.log")), LogPublisher())
    debug_on = partial(controller.enabled_for, LogLevel.debug, ACCESS_LOG_NAMESPACE)
    assert not debug_on()
    assert not debug_on()  # remembered
    controller.apply(settings(level="debug", file=str(tmp_path / "server.log")))
    assert debug_on()
    controller.apply(settings(level="warn", file=str(tmp_path / "server.log")))
    assert not debug_on()
    assert not controller.enabled_for(LogLevel.info, "amaters.other")
    controller.predicate.setLogLevelForNamespace("amaters", LogLevel.debug)
    assert debug_on()
    assert controller.enabled_for(LogLevel.info, "amaters.other")
    controller.predicate.clearLogLevels()  # back to the default level (warn, from the last apply)
    assert not debug_on()
    assert controller.enabled_for(LogLevel.warn, ACCESS_LOG_NAMESPACE)


def test_access_log_follows_a_logging_reload(tmp_path: Path) -> None:
    """The access log stage keeps the threshold and the debug decision as attributes; a reload of
    ``[logging]`` (the controller's apply) refreshes both, so the next request sees the new level
    and the new slow_request_ms."""
    from functools import partial

    log_file = str(tmp_path / "server.log")
    controller = LogController(settings(level="info", file=log_file), LogPublisher())
    events: list[LogEvent] = []
    clock = Clock()
    clock.advance(10)
    stage = AccessLogStage(clock, 1000, partial(controller.enabled_for, LogLevel.debug, ACCESS_LOG_NAMESPACE))
    stage._log = Logger(namespace=ACCESS_LOG_NAMESPACE, observer=events.append)
    controller.watch(stage.logging_changed)
    op = ops.Get("users", b"k")
    stage.after(RequestContext(1, ANONYMOUS, started=9.8), op, None)  # 200 ms, info: nothing
    assert events == []
    controller.apply(settings(level="debug", file=log_file))
    stage.after(RequestContext(2, ANONYMOUS, started=9.8), op, None)
    assert [e["log_level"] for e in events] == [LogLevel.debug]
    controller.apply(settings(level="info", file=log_file, slow_request_ms=100))
    stage.after(RequestContext(3, ANONYMOUS, started=9.8), op, None)
    assert [e["log_level"] for e in events] == [LogLevel.debug, LogLevel.warn]
    assert events[-1]["threshold"] == 100


def test_slow_request_threshold_uses_the_rounded_duration() -> None:
    """A request a hair under slow_request_ms whose duration rounds (to the µs the event shows) up
    to the threshold warns; one clearly under it does not."""
    events: list[LogEvent] = []
    clock = Clock()
    clock.advance(10)
    stage = access_stage(events, clock, slow_ms=100, debug=False)
    stage.after(RequestContext(1, ANONYMOUS, started=10 - 0.0999996), ops.Get("c", b"k"), None)
    (event,) = events
    assert (event["log_level"], event["duration_ms"]) == (LogLevel.warn, 100.0)
    stage.after(RequestContext(2, ANONYMOUS, started=10 - 0.0999), ops.Get("c", b"k"), None)
    assert len(events) == 1


def test_access_log_without_arrival_time() -> None:
    """A request whose protocol recorded no arrival time logs duration -1 and is never slow."""
    events: list[LogEvent] = []
    clock = Clock()
    clock.advance(1000)
    stage = access_stage(events, clock, slow_ms=1, debug=True)
    stage.after(RequestContext(1, ANONYMOUS), ops.Get("c", b"k"), None)
    (event,) = events
    assert (event["log_level"], event["duration_ms"]) == (LogLevel.debug, -1.0)
