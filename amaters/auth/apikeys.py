"""API keys: the keys file, peppered hashes, and :class:`APIKeyChecker` (a ``twisted.cred`` checker).

Keys made by ``amaters auth new-key`` look like ``<id>.<secret>``: ``ak_3f9c2a1b7e4d.`` followed by
43 characters of URL-safe base64 (256 random bits).  The id is public (it names the key in the
audit log); the secret is shown once and never stored.  The keys file stores, per key::

    [[keys]]
    id = "ak_3f9c2a1b7e4d"
    name = "billing service"
    key_hash = "<64 hex digits>"     # HMAC-SHA256(pepper, whole key), amaters auth hash-key
    roles = ["user"]
    expires_at = 2026-12-31T00:00:00Z   # optional; a TOML date-time or an RFC 3339 string

A JSON file (name ending in ``.json``) holds ``{"keys": [ {...}, ... ]}``.

Checking a key: its HMAC with the pepper is computed once, the entry is found by the id before the
first ``.`` and the hashes are compared with :func:`hmac.compare_digest`.  A key whose prefix names
no entry (e.g. a key minted elsewhere and hashed with ``amaters auth hash-key``) is compared with
every entry, each in constant time and without stopping early.  An unknown key and a wrong secret
get the same answer ("invalid API key").  Key ids are not secret (they name keys in the audit log):
the secret half is what the constant-time comparison protects.

Why a pepper: the keys file (or a backup of it) alone does not allow testing guesses offline, since
every guess needs the pepper, which lives in the server's configuration (or its own file) only.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from amaters.auth.files import AuthConfigError, read_structured_file, string_list
from amaters.auth.principal import AUTH_API_KEY, ExpiredCredentials, IAPIKey, Principal

#: Shortest pepper accepted, in bytes.
MIN_PEPPER_BYTES = 16

#: Longest key accepted, in characters.
MAX_KEY_LENGTH = 1024

KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset({"id", "name", "key_hash", "roles", "expires_at"})


def hash_api_key(pepper: bytes, key: str) -> str:
    """The ``key_hash`` stored for ``key``: HMAC-SHA256 keyed with the pepper, as lowercase hex."""
    return hmac.new(pepper, key.encode("utf-8"), hashlib.sha256).hexdigest()


def generate_api_key(key_id: str | None = None) -> tuple[str, str]:
    """A new ``(id, key)``: the key is ``<id>.<secret>`` with 256 random bits of secret."""
    if key_id is None:
        key_id = "ak_" + secrets.token_hex(6)
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise ValueError("a key id is 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return key_id, f"{key_id}.{secrets.token_urlsafe(32)}"


@attrs.frozen
class APIKeyEntry:
    """One line of the keys file.  ``expires_at`` is seconds since the epoch (None: never)."""

    id: str
    name: str
    key_hash: str = attrs.field(repr=False)
    roles: tuple[str, ...]
    expires_at: float | None = None


def _parse_time(value: Any) -> float | None:
    if isinstance(value, datetime.datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value.strip().replace("z", "Z"))
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:
        return None
    return moment.timestamp()


def parse_api_keys(data: Any, where: str = "auth.api_keys_file") -> dict[str, APIKeyEntry]:
    """The entries of a parsed keys file, by id.  Raises AuthConfigError listing every problem."""
    items = data.get("keys") if isinstance(data, Mapping) else data
    if isinstance(data, Mapping) and set(data) - {"keys"}:
        unknown = ", ".join(sorted(str(k) for k in set(data) - {"keys"}))
        raise AuthConfigError([f"{where}: unknown top-level key(s) {unknown}; expected only 'keys'"])
    if items is None:
        items = []
    if not isinstance(items, list):
        raise AuthConfigError([f"{where}: 'keys' must be a list of tables ([[keys]] in TOML)"])
    problems: list[str] = []
    entries: dict[str, APIKeyEntry] = {}
    for index, item in enumerate(items):
        here = f"{where}: keys[{index}]"
        if not isinstance(item, Mapping):
            problems.append(f"{here}: must be a table")
            continue
        unknown_fields = sorted(str(k) for k in set(item) - _FIELDS)
        if unknown_fields:
            problems.append(f"{here}: unknown field(s) {', '.join(unknown_fields)}")
        key_id = item.get("id")
        if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
            problems.append(f"{here}: 'id' must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'")
            continue
        here = f"{where}: key {key_id!r}"
        if key_id in entries:
            problems.append(f"{here}: the id appears more than once")
            continue
        name = item.get("name", key_id)
        if not isinstance(name, str):
            problems.append(f"{here}: 'name' must be a string")
            continue
        key_hash = item.get("key_hash")
        if not isinstance(key_hash, str) or not _HASH_PATTERN.fullmatch(key_hash.lower()):
            problems.append(f"{here}: 'key_hash' must be 64 hex digits (amaters auth hash-key prints it)")
            continue
        roles = string_list(item.get("roles", []))
        if roles is None:
            problems.append(f"{here}: 'roles' must be a list of role names")
            continue
        expires_at = None
        if "expires_at" in item:
            expires_at = _parse_time(item["expires_at"])
            if expires_at is None:
                problems.append(
                    f"{here}: 'expires_at' must be a date-time with a UTC offset, e.g. 2026-12-31T00:00:00Z"
                )
                continue
        entries[key_id] = APIKeyEntry(key_id, name, key_hash.lower(), roles, expires_at)
    if problems:
        raise AuthConfigError(problems)
    return entries


def load_api_keys(path: str) -> dict[str, APIKeyEntry]:
    """The entries of the keys file at ``path`` (TOML, or JSON for ``*.json``)."""
    return parse_api_keys(read_structured_file(path, "auth.api_keys_file"))


def check_pepper(pepper: bytes) -> None:
    """Raise AuthConfigError when ``pepper`` is too short to be a secret."""
    if len(pepper) < MIN_PEPPER_BYTES:
        raise AuthConfigError(
            [f"auth.api_key_pepper: must be at least {MIN_PEPPER_BYTES} bytes (this one has {len(pepper)})"]
        )


@implementer(ICredentialsChecker)
class APIKeyChecker:
    """Checks :class:`~amaters.auth.principal.IAPIKey` credentials; the avatar id is a Principal.

    Fails with ``UnauthorizedLogin("invalid API key")`` for an unknown key or a wrong secret and
    ``ExpiredCredentials`` for a key past its ``expires_at`` (only once the secret matched).
    """

    credentialInterfaces = (IAPIKey,)

    def __init__(self, entries: Iterable[APIKeyEntry], pepper: bytes, clock: IReactorTime) -> None:
        check_pepper(pepper)
        self._pepper = pepper
        self._by_id = {entry.id: entry for entry in entries}
        self._all = tuple(self._by_id.values())
        self.clock = clock

    def __repr__(self) -> str:
        return f"<APIKeyChecker with {len(self._all)} key(s)>"

    def requestAvatarId(self, credentials: IAPIKey) -> defer.Deferred[Principal]:  # type: ignore[override]
        # cred types avatar ids as bytes; ours is the Principal, as roles come with the credentials.
        try:
            return defer.succeed(self.verify(credentials.key))
        except UnauthorizedLogin:
            return defer.fail()

    def verify(self, key: str) -> Principal:
        """The principal for ``key``, or ``UnauthorizedLogin``."""
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            raise UnauthorizedLogin("invalid API key")
        digest = hash_api_key(self._pepper, key).encode("ascii")
        key_id, dot, _ = key.partition(".")
        entry = self._by_id.get(key_id) if dot else None
        found: APIKeyEntry | None = None
        if entry is not None:
            if hmac.compare_digest(digest, entry.key_hash.encode("ascii")):
                found = entry
        else:
            for candidate in self._all:
                # No early exit: every entry costs the same whether or not it matches.
                if hmac.compare_digest(digest, candidate.key_hash.encode("ascii")):
                    found = candidate
        if found is None:
            raise UnauthorizedLogin("invalid API key")
        if found.expires_at is not None and self.clock.seconds() >= found.expires_at:
            raise ExpiredCredentials(f"API key {found.id!r} expired")
        return Principal(id=found.id, name=found.name, roles=found.roles, auth_method=AUTH_API_KEY)


__all__ = [
    "APIKeyChecker",
    "APIKeyEntry",
    "check_pepper",
    "generate_api_key",
    "hash_api_key",
    "load_api_keys",
    "parse_api_keys",
]
