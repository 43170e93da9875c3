"""Log output: text or JSON lines, a level filter, and a rotated log file, on ``twisted.logger``.

Everything in amaters logs through ``twisted.logger.Logger`` with named fields.  This module decides
where those events go and how they look (``[logging]`` in the config):

- ``logging.level`` drops events below it.  The :class:`~twisted.logger.LogLevelFilterPredicate`
  doing that is :attr:`LogController.predicate`; :meth:`LogController.apply` changes it in place, so a
  SIGHUP reload takes effect on the next event.
- ``logging.format``: ``text`` is twistd's classic line (``2024-05-01T12:00:00+0000 [namespace#info]
  message``); ``json`` is one JSON object per line with ``time``, ``level``, ``namespace``,
  ``message`` and every named field of the event (see :func:`format_json`).  In both, control
  characters in field values (names a client chose: client names, token subjects, collection names)
  are written as ``\\xNN`` escapes (:func:`escape_control`), so a client cannot forge log lines or send
  terminal escape sequences to whoever reads the log.
- ``logging.file``: a file rotated by size (``logging.max_bytes``; ``twisted.python.logfile.LogFile``)
  or daily (``logging.rotate = "daily"``; ``DailyLogFile``), keeping ``logging.max_files`` rotated
  files.  Empty: events go where twistd sends its log (standard output under ``twistd -n``, the
  ``--logfile`` otherwise).

twistd installs its own observer (a ``FileLogObserver`` writing classic text to stdout or its log
file) before any service starts.  :class:`LoggingService` takes over when the service tree starts
(in ``privilegedStartService``, so before any other service logs and before privileges are shed):
it removes twistd's file observers from the global publisher and installs one filtered observer of
its own, writing to ``logging.file`` or, when that is empty, to the same streams twistd's observers
wrote to.  When the service stops (last of the tree) twistd's observers are put back, so the final
shutdown lines still appear.  Observers that are not file observers (a ``--logger`` of your own, a
test's) are left untouched.  ``docs/observability.md`` describes the behaviour for operators.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.application import service
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python import threadable
from twisted.python.logfile import BaseLogFile, DailyLogFile, LogFile

from amaters.config import Config, LoggingConfig

LEVELS: Mapping[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

#: Log files may name principals and peers: readable by the owner and the group only.
LOG_FILE_MODE = 0o640

# Keys of events converted from twisted.python.log (the legacy API): shown through "message".
_LEGACY_KEYS = frozenset({"message", "isError", "system", "time", "format", "why", "failure", "printed"})
_RESERVED = frozenset({"time", "level", "namespace", "message", "system", "error", "error_type", "traceback"})


# -- formats ---------------------------------------------------------------------------------------

#: C0 and C1 control characters, DEL, line and paragraph separators, and bidirectional overrides.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    r"""``text`` with every control character written as a visible escape (``\x1b``, ``\u202e``)."""
    return _CONTROL.sub(_escape_one, text)


def _escaped_value(value: Any) -> Any:
    if isinstance(value, str):
        return _CONTROL.sub(_escape_one, value)
    if isinstance(value, (list, tuple)):
        return type(value)(_escaped_value(v) for v in value)
    return value


def escaped_fields(event: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``event`` whose field values (not twisted.logger's own ``log_*`` keys) have their
    control characters escaped; objects are escaped through their ``str()``."""
    out: dict[str, Any] = {}
    for name, value in event.items():
        if name.startswith("log_") or value is None or isinstance(value, (bool, int, float)):
            out[name] = value
        elif isinstance(value, (str, list, tuple)):
            out[name] = _escaped_value(value)
        else:
            text = str(value)
            out[name] = _CONTROL.sub(_escape_one, text) if _CONTROL.search(text) else value
    return out


def format_text(event: Mapping[str, Any]) -> str | None:
    """twistd's classic text line (with the traceback of a failure, indented); field values have
    their control characters escaped."""
    return formatEventAsClassicLogText(escaped_fields(event))


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def format_json(event: Mapping[str, Any]) -> str | None:
    """One JSON object and a newline: ``time`` (RFC 3339, UTC), ``level``, ``namespace``, ``message``.

    Every named field of the event follows under its own name (fields clashing with those names get
    a ``field_`` prefix); ``system`` is twistd's log system; a logged failure adds ``error``,
    ``error_type`` and ``traceback``.  Values that are not JSON types are written as ``str()``.
    """
    event = escaped_fields(event)
    stamp = event.get("log_time")
    when = datetime.fromtimestamp(stamp if stamp is not None else time.time(), tz=UTC)
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(dict(event)),
    }
    system = event.get("log_system")
    if system not in (None, "-"):
        out["system"] = str(system)
    failure = event.get("log_failure")
    if failure is not None:
        out["error"] = failure.getErrorMessage()
        out["error_type"] = getattr(failure.type, "__name__", str(failure.type))
        out["traceback"] = failure.getTraceback()
    legacy = event.get("log_namespace") == "log_legacy"
    for name, value in event.items():
        if name.startswith(("log_", "_")) or (legacy and name in _LEGACY_KEYS):
            continue
        out["field_" + name if name in _RESERVED else name] = _jsonable(value)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n"


FORMATS: Mapping[str, Callable[[Mapping[str, Any]], str | None]] = {"text": format_text, "json": format_json}


# -- files -----------------------------------------------------------------------------------------


class PrunedDailyLogFile(DailyLogFile):
    """A :class:`DailyLogFile` that keeps at most ``max_files`` rotated files (Twisted's keeps all).

    ``clock`` gives the current time (``time.time``; tests pass a fake one).
    """

    _DATED = re.compile(r"\.(\d{4})_(\d{1,2})_(\d{1,2})$")
    #: Our rotate (with its pruning) holds the same per-file lock as the inherited write.
    synchronized = ["rotate"]

    def __init__(
        self,
        name: str,
        directory: str,
        max_files: int,
        clock: Callable[[], float] = time.time,
        defaultMode: int | None = None,
    ) -> None:
        self.max_files = max_files
        self._clock = clock
        super().__init__(name, directory, defaultMode=defaultMode)

    def toDate(self, *args: float) -> tuple[int, int, int]:
        if not args:
            args = (self._clock(),)
        year, month, day = time.localtime(*args)[:3]
        return year, month, day

    def rotate(self) -> None:
        DailyLogFile.rotate(self)
        self.prune()

    def rotated_files(self) -> list[str]:
        """The rotated files, oldest first."""
        found = []
        prefix = self.name + "."
        for entry in os.listdir(self.directory):
            if not entry.startswith(prefix):
                continue
            match = self._DATED.search(entry)
            if match and entry == self.name + match.group(0):
                found.append((tuple(int(g) for g in match.groups()), entry))
        return [os.path.join(self.directory, entry) for _, entry in sorted(found)]

    def prune(self) -> None:
        """Delete the oldest rotated files beyond ``max_files``."""
        rotated = self.rotated_files()
        for path in rotated[: max(0, len(rotated) - self.max_files)]:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


threadable.synchronize(PrunedDailyLogFile)


def open_log_file(settings: LoggingConfig, clock: Callable[[], float] = time.time) -> BaseLogFile:
    """The rotating file for ``logging.file`` (its directory is created if missing)."""
    path = os.path.abspath(settings.file)
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    if settings.rotate == "daily":
        return PrunedDailyLogFile(name, directory, settings.max_files, clock, defaultMode=LOG_FILE_MODE)
    return LogFile(
        name,
        directory,
        rotateLength=settings.max_bytes,
        maxRotatedFiles=settings.max_files,
        defaultMode=LOG_FILE_MODE,
    )


#: Set by ``amaters start`` for a daemonized server: the file twistd's JSON observer writes to.
TWISTD_LOG_FILE_ENV = "AMATERS_TWISTD_LOGFILE"


def twistd_json_observer() -> ILogObserver:
    """JSON lines for ``twistd --logger=amaters.ops.logging.twistd_json_observer``.

    twistd logs a few lines of its own before any service starts and after the last one stops;
    with this as twistd's observer those are JSON too (the logging service adopts it like any file
    observer, and writes the server's own events to the same place).  twistd ignores ``--logfile``
    when ``--logger`` is given, and a daemon's standard output is /dev/null, so the destination is
    the file named by the ``AMATERS_TWISTD_LOGFILE`` environment variable (``amaters start`` sets it
    to the server's log file), rotated like twistd's own ``--logfile``; without it, standard output
    (for ``twistd -n``).
    """
    path = os.environ.get(TWISTD_LOG_FILE_ENV)
    if path:
        log_file = LogFile.fromFullPath(path, defaultMode=LOG_FILE_MODE)
        return FileLogObserver(log_file, format_json)
    return FileLogObserver(sys.stdout, format_json)


# -- the controller --------------------------------------------------------------------------------


class LevelPredicate(LogLevelFilterPredicate):
    """A :class:`~twisted.logger.LogLevelFilterPredicate` that remembers :meth:`enabled_for` answers.

    The access log asks "is debug on for ``amaters.access``?" on every request; the answer only
    changes when a level does, so it is kept per (level, namespace) and forgotten whenever
    :meth:`setLogLevelForNamespace` or :meth:`clearLogLevels` changes the levels (a reload).
    """

    #: Remembered answers are few (fixed namespaces); past this many they are dropped and rebuilt.
    MAX_DECISIONS = 1024

    def __init__(self, defaultLogLevel: LogLevel = LogLevel.info) -> None:
        self.decisions: dict[tuple[LogLevel, str], bool] = {}
        super().__init__(defaultLogLevel)

    def enabled_for(self, level: LogLevel, namespace: str = "") -> bool:
        """Whether an event at ``level`` in ``namespace`` passes this filter."""
        key = (level, namespace)
        decision = self.decisions.get(key)
        if decision is None:
            decision = bool(level >= self.logLevelForNamespace(namespace))
            if len(self.decisions) >= self.MAX_DECISIONS:
                self.decisions.clear()
            self.decisions[key] = decision
        return decision

    def setLogLevelForNamespace(self, namespace: str, level: LogLevel) -> None:
        super().setLogLevelForNamespace(namespace, level)
        self.decisions.clear()

    def clearLogLevels(self) -> None:
        super().clearLogLevels()
        self.decisions.clear()


def _observers_of(publisher: Any) -> list[ILogObserver]:
    # LogPublisher has no public way to list its observers; twistd's must be found to replace them.
    return list(getattr(publisher, "_observers", ()))


class LogController:
    """Builds our observer from ``[logging]``, installs it on ``publisher``, and applies reloads.

    ``publisher`` is ``twisted.logger.globalLogPublisher`` in the server; tests pass their own
    :class:`~twisted.logger.LogPublisher`.
    """

    def __init__(
        self,
        settings: LoggingConfig,
        publisher: LogPublisher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.publisher: LogPublisher = publisher if publisher is not None else globalLogPublisher
        self.clock = clock
        #: The level filter; :meth:`apply` changes it in place.
        self.predicate = LevelPredicate(LEVELS[settings.level])
        self._outputs = LogPublisher()
        #: What we add to the publisher: the level filter in front of our outputs.
        self.observer = FilteringLogObserver(self._outputs, [self.predicate])
        self.log_file: BaseLogFile | None = None
        self._watchers: list[Callable[[LoggingConfig], None]] = []
        self._adopted: list[ILogObserver] = []
        self._output_count = 0
        self.installed = False

    # -- queries --------------------------------------------------------------------------------

    def enabled_for(self, level: LogLevel, namespace: str = "") -> bool:
        """Whether an event at ``level`` in ``namespace`` would be written (skip building it if not).

        Cheap enough to ask per request: the answer is remembered until a level changes.
        """
        decision = self.predicate.decisions.get((level, namespace))
        if decision is None:
            return self.predicate.enabled_for(level, namespace)
        return decision

    def format(self, event: Mapping[str, Any]) -> str | None:
        """Format ``event`` per the current ``logging.format``."""
        return FORMATS[self.settings.format](event)

    # -- install / uninstall ---------------------------------------------------------------------

    def install(self) -> None:
        """Replace the publisher's file observers with ours (idempotent).  Raises OSError if the log
        file cannot be opened; nothing changes then."""
        if self.installed:
            return
        adopted: list[ILogObserver] = [
            o for o in _observers_of(self.publisher) if isinstance(o, FileLogObserver)
        ]
        outputs: list[ILogObserver] = []
        if self.settings.file:
            self.log_file = open_log_file(self.settings, self.clock)
            # A LogFile is a file-like object (write, flush); FileLogObserver only needs those.
            outputs.append(FileLogObserver(self.log_file, self.format))  # type: ignore[arg-type]
        else:
            for observer in adopted:
                stream: IO[Any] | None = getattr(observer, "_outFile", None)
                outputs.append(FileLogObserver(stream, self.format) if stream is not None else observer)
        self._adopted = adopted
        for observer in adopted:
            self.publisher.removeObserver(observer)
        for output in outputs:
            self._outputs.addObserver(output)
        self._output_count = len(outputs)
        if outputs:
            self.publisher.addObserver(self.observer)
        self.installed = True

    def uninstall(self) -> None:
        """Remove our observer, give the adopted observers back, close our file."""
        if not self.installed:
            return
        self.installed = False
        self.publisher.removeObserver(self.observer)
        for observer in self._adopted:
            self.publisher.addObserver(observer)
        self._adopted = []
        self._outputs = LogPublisher()
        self.observer = FilteringLogObserver(self._outputs, [self.predicate])
        log_file, self.log_file = self.log_file, None
        if log_file is not None:
            log_file.close()

    @property
    def outputs(self) -> int:
        """How many destinations our observer writes to (0: nothing was taken over)."""
        return self._output_count if self.installed else 0

    # -- reload ----------------------------------------------------------------------------------

    def apply(self, settings: LoggingConfig) -> None:
        """Apply reloadable settings: ``level`` and ``format`` take effect on the next event.

        ``file``, ``rotate``, ``max_bytes`` and ``max_files`` need a restart.
        """
        level = LEVELS[settings.level]
        self.predicate.defaultLogLevel = level
        self.predicate.setLogLevelForNamespace("", level)
        self.settings = settings
        for watcher in self._watchers:
            watcher(settings)

    def watch(self, watcher: Callable[[LoggingConfig], None]) -> None:
        """Call ``watcher(settings)`` after every :meth:`apply` (levels and settings in effect)."""
        self._watchers.append(watcher)


class LoggingService(service.Service):
    """The ``logging`` service: our observers are installed while it runs (see the module docstring).

    It must be the first child of the root service, so it starts before and stops after the rest.
    """

    name = "logging"

    def __init__(
        self,
        settings: LoggingConfig,
        publisher: LogPublisher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.controller = LogController(settings, publisher, clock)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # Open the log file before privileges are shed (like twistd's own --logfile).  A failure is
        # reported by startService, through the service tree's start error handling.
        try:
            self.controller.install()
        except OSError:
            pass

    def startService(self) -> None:
        super().startService()
        try:
            self.controller.install()
        except OSError as e:
            raise OSError(
                e.errno, f"cannot open logging.file {self.controller.settings.file!r}: {e.strerror}"
            ) from None

    def stopService(self) -> None:
        super().stopService()
        self.controller.uninstall()

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        """A reload changing ``logging.level``, ``logging.format`` or ``logging.slow_request_ms``
        applies them in place."""
        fields = ("level", "format", "slow_request_ms")
        if all(getattr(old.logging, f) == getattr(new.logging, f) for f in fields):
            return None
        settings = new.logging
        return lambda: self.controller.apply(settings)
