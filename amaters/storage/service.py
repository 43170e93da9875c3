"""The ``storage`` service: opens the backend on start; flushes and closes it on stop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from amaters.config import Config
from amaters.interfaces import IStorageBackend
from amaters.storage import innermost
from amaters.storage.groupcommit import GroupCommitter


class StorageService(service.Service):
    """Owns an :class:`IStorageBackend`'s lifetime.  ``is_open`` feeds readiness."""

    name = "storage"
    _log = Logger()

    def __init__(self, backend: IStorageBackend) -> None:
        self.backend = backend
        self.is_open = False

    @property
    def write_problem(self) -> str | None:
        """Why writes fail right now (a full disk), or None: readiness and health report it."""
        problem = getattr(innermost(self.backend), "write_problem", None)
        return problem if isinstance(problem, str) else None

    @property
    def group_commit(self) -> GroupCommitter | None:
        """The backend's group committer (its WAL syncs), or None for a backend without one."""
        committer = getattr(innermost(self.backend), "group_commit", None)
        return committer if isinstance(committer, GroupCommitter) else None

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        """``storage.group_commit_delay_us`` and ``_min_writers`` take effect from the next sync
        (``sync = always``)."""
        committer = self.group_commit
        if committer is None or new.storage.sync != "always":
            return None
        delay = new.storage.group_commit_delay_us / 1e6
        writers = new.storage.group_commit_delay_min_writers
        if delay == committer.delay and writers == committer.min_writers:
            return None

        def commit() -> None:
            committer.delay = delay
            committer.min_writers = writers
            self._log.info(
                "Group commit delay now {delay_us} µs from {writers} writers",
                delay_us=new.storage.group_commit_delay_us,
                writers=writers,
            )

        return commit

    def startService(self) -> defer.Deferred[None]:
        super().startService()
        d: defer.Deferred[Any] = defer.maybeDeferred(self.backend.open)

        def opened(_: object) -> None:
            self.is_open = True
            self._log.info("Storage backend {backend} open", backend=self.backend.name)

        d.addCallback(opened)
        return d

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if not self.is_open:
            return
        self.is_open = False
        try:
            await defer.maybeDeferred(self.backend.flush)
        finally:
            await defer.maybeDeferred(self.backend.close)
        self._log.info("Storage backend {backend} closed", backend=self.backend.name)
