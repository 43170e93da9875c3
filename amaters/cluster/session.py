"""Shard revisions per request, for session tokens (read-your-writes across nodes).

The protocol handler opens a :class:`RevisionScope` for each request in clustered mode with the
revisions the client sent (its session token) and sets it as the current scope while the request
starts; the etcd backend reads :func:`wanted` before a read and reports every revision it read at or
wrote with :func:`observe`.  The handler copies the observed revisions into the response.

The scope travels in a context variable: Twisted runs each coroutine in a copy of the context it
was created in, so the backend's coroutines see the scope of the request that started them.

A session token is text ``shard:revision`` pairs joined by commas, e.g. ``"0:1842"``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping

__all__ = ["RevisionScope", "current", "format_token", "observe", "parse_token", "wanted"]


class RevisionScope:
    """The revisions one request wants (from the client) and saw (from the backend)."""

    __slots__ = ("seen", "want")

    def __init__(self, want: Mapping[str, int] | None = None) -> None:
        self.want = dict(want or {})
        self.seen: dict[str, int] = {}


_scope: contextvars.ContextVar[RevisionScope | None] = contextvars.ContextVar(
    "amaters_revisions", default=None
)


def current() -> RevisionScope | None:
    return _scope.get()


def enter(scope: RevisionScope) -> contextvars.Token[RevisionScope | None]:
    """Make ``scope`` current (undo with :func:`leave`)."""
    return _scope.set(scope)


def leave(token: contextvars.Token[RevisionScope | None]) -> None:
    _scope.reset(token)


def wanted(shard: str) -> int:
    """The revision the current request must read at or after on ``shard`` (0: any)."""
    scope = _scope.get()
    return scope.want.get(shard, 0) if scope is not None else 0


def observe(shard: str, revision: int) -> None:
    """Record that the current request read or wrote ``shard`` at ``revision``."""
    scope = _scope.get()
    if scope is not None and revision > scope.seen.get(shard, 0):
        scope.seen[shard] = revision


def format_token(revisions: Mapping[str, int]) -> str:
    """The session token text for ``revisions``."""
    return ",".join(f"{shard}:{revision}" for shard, revision in sorted(revisions.items()))


def parse_token(token: str) -> dict[str, int]:
    """The revisions of a session token; ValueError with a one-line reason when malformed."""
    revisions: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in token.split(","))):
        shard, sep, number = part.rpartition(":")
        if not sep or not shard or not number.isdigit():
            raise ValueError(f"session token part {part!r} is not shard:revision")
        revisions[shard] = max(revisions.get(shard, 0), int(number))
    return revisions
