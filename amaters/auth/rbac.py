"""Role-based access control: permissions read < write < create < admin on ``server`` and
``collection:<glob>``.

A role grants permissions on resource patterns and may inherit other roles.  A principal may do
what any of its roles (with everything they inherit) grants; anything not granted is denied,
including everything for a principal whose roles are all unknown.

Resources and patterns:

- ``server``: the server itself (server info, health, listing collections; admin operations
  such as snapshots);
- ``collection:<name>``: one collection; a pattern's name part is a glob (``*``, ``?``, ``[...]``,
  matched case-sensitively), e.g. ``collection:*`` or ``collection:tenant_a_*``;
- ``*`` (pattern only): every resource.

A higher permission includes the lower ones: admin includes create includes write includes read.
``create`` on a collection (``collection:create``) is the right to bring it into existence, by
CREATE_COLLECTION or by a first SET (auto-creation): only ``admin`` has it among the built-in
roles, and a custom role gets it for the collections it should create, e.g.
``{ resource = "collection:tenant_a_*", permission = "create" }``.

Built-in roles: ``admin`` (admin on everything), ``user`` (write on every existing collection, read
on the server), ``reader`` (read on every collection and on the server).  Custom roles come from
``auth.roles_file`` (TOML, or JSON for ``*.json``)::

    [roles.analyst]
    inherits = ["reader"]
    permissions = [
        { resource = "collection:reports_*", permission = "write" },
    ]

What each operation needs (:func:`required_access`): GET, RANGE, FILTER → read on its collection;
SET, DELETE, UPDATE → write on its collection (and create when the collection does not exist yet:
the RBAC stage checks that); BATCH → each of its items on its own collection; create collection →
create on that collection; drop collection → admin on that collection; server info, health and list collections →
read on ``server``; other server operations (snapshots, admin API) → their declared ``kind`` on
``server``.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from amaters.auth.files import AuthConfigError, read_structured_file, string_list


class Permission(enum.IntEnum):
    """What a grant allows; a higher one includes the lower ones."""

    READ = 1
    WRITE = 2
    CREATE = 3
    ADMIN = 4

    @property
    def label(self) -> str:
        """The permission as written in roles files and messages: read, write or admin."""
        return self.name.lower()


SERVER = "server"
_UNKNOWN: Any = object()
COLLECTION_PREFIX = "collection:"
ROLE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def collection_resource(name: str) -> str:
    """The resource name of a collection: ``collection:<name>``."""
    return COLLECTION_PREFIX + name


def check_pattern(pattern: str) -> str | None:
    """None if ``pattern`` is a valid resource pattern, else what is allowed."""
    if pattern in ("*", SERVER):
        return None
    if pattern.startswith(COLLECTION_PREFIX) and len(pattern) > len(COLLECTION_PREFIX):
        return None
    return "'server', 'collection:<name or glob>' or '*'"


@attrs.frozen
class Grant:
    """``permission`` on every resource ``pattern`` matches."""

    pattern: str
    permission: Permission

    def matches(self, resource: str) -> bool:
        """Whether the grant's pattern covers ``resource`` (globs match collection names only)."""
        pattern = self.pattern
        if pattern == "*":
            return True
        if pattern == SERVER:
            return resource == SERVER
        if resource.startswith(COLLECTION_PREFIX):
            return fnmatch.fnmatchcase(resource[len(COLLECTION_PREFIX) :], pattern[len(COLLECTION_PREFIX) :])
        return False

    def allows(self, resource: str, permission: Permission) -> bool:
        """Whether the grant covers ``resource`` at ``permission`` or higher."""
        return self.permission >= permission and self.matches(resource)


@attrs.frozen
class Role:
    """A named set of grants, plus the roles whose grants it inherits."""

    name: str
    grants: tuple[Grant, ...] = ()
    inherits: tuple[str, ...] = ()


BUILTIN_ROLES: Mapping[str, Role] = {
    "admin": Role("admin", (Grant("*", Permission.ADMIN),)),
    "user": Role("user", (Grant("collection:*", Permission.WRITE), Grant(SERVER, Permission.READ))),
    "reader": Role("reader", (Grant("collection:*", Permission.READ), Grant(SERVER, Permission.READ))),
}


@attrs.frozen
class Access:
    """One thing an operation needs: ``permission`` on ``resource``, for ``operation``."""

    operation: str
    resource: str
    permission: Permission


def required_access(op: Any) -> tuple[Access, ...]:
    """Everything ``op`` needs.  An operation that declares no known ``kind`` needs admin on server.

    Operations declare ``name``, ``kind`` (read/write/admin) and ``collection`` (None for server
    operations); a batch needs what each of its items needs.
    """
    items = getattr(op, "ops", None)
    if getattr(op, "name", None) == "batch" and isinstance(items, tuple):
        return tuple(
            Access(f"batch ({access.operation})", access.resource, access.permission)
            for item in items
            for access in required_access(item)
        )
    name = str(getattr(op, "name", type(op).__name__))
    try:
        permission = Permission[str(getattr(op, "kind", "")).upper()]
    except KeyError:
        permission = Permission.ADMIN  # deny by default: an unknown kind needs the most
    collection = getattr(op, "collection", None)
    resource = collection_resource(collection) if isinstance(collection, str) else SERVER
    return (Access(name, resource, permission),)


def _cycle(roles: Mapping[str, Role]) -> list[str] | None:
    """A cycle of inheritance as a path (first name repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for parent in roles[name].inherits:
            if parent not in roles:
                continue
            if state.get(parent) == 1:
                return [*path[path.index(parent) :], parent]
            if parent not in state:
                found = visit(parent)
                if found:
                    return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(roles):
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None


class RBACPolicy:
    """The roles in force and the decisions they give.  Immutable: a reload builds a new one.

    Raises :class:`~amaters.auth.files.AuthConfigError` when a role inherits an unknown role or
    inheritance forms a cycle.
    """

    #: Decisions remembered per (roles, resource, permission); cleared when it grows past this.
    CACHE_SIZE = 8192

    def __init__(self, custom: Iterable[Role] = ()) -> None:
        roles = dict(BUILTIN_ROLES)
        problems = []
        for role in custom:
            if role.name in BUILTIN_ROLES:
                problems.append(f"role {role.name!r} is built in and cannot be redefined")
            elif role.name in roles:
                problems.append(f"role {role.name!r} is defined twice")
            else:
                roles[role.name] = role
        for role in roles.values():
            for parent in role.inherits:
                if parent not in roles:
                    problems.append(f"role {role.name!r} inherits unknown role {parent!r}")
        cycle = _cycle(roles)
        if cycle:
            problems.append("roles inherit in a cycle: " + " -> ".join(cycle))
        if problems:
            raise AuthConfigError(problems)
        self.roles: Mapping[str, Role] = roles
        self._effective = {name: self._resolve(name) for name in roles}
        self._cache: dict[tuple[tuple[str, ...], str, Permission], bool] = {}
        self._denials: dict[tuple[tuple[str, ...], type, Any], Any] = {}

    def _resolve(self, name: str) -> tuple[Grant, ...]:
        seen: set[str] = set()
        grants: list[Grant] = []
        stack = [name]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            role = self.roles[current]
            grants.extend(role.grants)
            stack.extend(role.inherits)
        return tuple(dict.fromkeys(grants))

    def grants_of(self, role: str) -> tuple[Grant, ...]:
        """Everything ``role`` grants, inherited grants included (nothing for an unknown role)."""
        return self._effective.get(role, ())

    def allowed(self, roles: Sequence[str], resource: str, permission: Permission) -> bool:
        """Whether any of ``roles`` grants ``permission`` (or more) on ``resource``."""
        key = (tuple(roles), resource, permission)
        decision = self._cache.get(key)
        if decision is None:
            decision = any(
                grant.allows(resource, permission) for role in key[0] for grant in self.grants_of(role)
            )
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = decision
        return decision

    def denial(self, roles: Sequence[str], op: Any) -> Access | None:
        """The first thing ``op`` needs that ``roles`` do not grant, or None when all is granted."""
        if getattr(op, "name", None) == "batch":
            return self._first_denied(roles, op)
        # Hot path: what a single operation needs depends only on its type and collection.
        key = (tuple(roles), type(op), getattr(op, "collection", None))
        found = self._denials.get(key, _UNKNOWN)
        if found is _UNKNOWN:
            found = self._first_denied(roles, op)
            if len(self._denials) >= self.CACHE_SIZE:
                self._denials.clear()
            self._denials[key] = found
        return found

    def _first_denied(self, roles: Sequence[str], op: Any) -> Access | None:
        for access in required_access(op):
            if not self.allowed(roles, access.resource, access.permission):
                return access
        return None

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_data(cls, data: Any, where: str = "auth.roles_file") -> RBACPolicy:
        """The policy for a parsed roles file.  Raises AuthConfigError listing every problem."""
        if not isinstance(data, Mapping):
            raise AuthConfigError([f"{where}: expected a table with a 'roles' table"])
        extra = sorted(str(k) for k in set(data) - {"roles"})
        if extra:
            raise AuthConfigError([f"{where}: unknown top-level key(s) {', '.join(extra)}; expected 'roles'"])
        table = data.get("roles", {})
        if not isinstance(table, Mapping):
            raise AuthConfigError([f"{where}: 'roles' must be a table of role name -> definition"])
        problems: list[str] = []
        roles = []
        for name, body in table.items():
            here = f"{where}: role {name!r}"
            if not isinstance(name, str) or not ROLE_NAME.fullmatch(name):
                problems.append(f"{here}: role names are 1 to 64 characters of A-Z, a-z, 0-9, '_.:-'")
                continue
            if not isinstance(body, Mapping):
                problems.append(f"{here}: must be a table with 'permissions' and/or 'inherits'")
                continue
            unknown = sorted(str(k) for k in set(body) - {"permissions", "inherits", "description"})
            if unknown:
                problems.append(f"{here}: unknown field(s) {', '.join(unknown)}")
            inherits = string_list(body.get("inherits", []))
            if inherits is None:
                problems.append(f"{here}: 'inherits' must be a list of role names")
                continue
            grants = []
            entries = body.get("permissions", [])
            if not isinstance(entries, list):
                problems.append(f"{here}: 'permissions' must be a list of {{resource, permission}} tables")
                continue
            for index, entry in enumerate(entries):
                spot = f"{here}: permissions[{index}]"
                if not isinstance(entry, Mapping) or set(entry) != {"resource", "permission"}:
                    problems.append(f"{spot}: must be a table with exactly 'resource' and 'permission'")
                    continue
                resource, permission = entry["resource"], entry["permission"]
                wrong = check_pattern(resource) if isinstance(resource, str) else "a string"
                if wrong:
                    problems.append(f"{spot}: resource {resource!r} is not allowed; expected {wrong}")
                    continue
                if not isinstance(permission, str) or permission.upper() not in Permission.__members__:
                    problems.append(
                        f"{spot}: permission {permission!r} is not one of read, write, create, admin"
                    )
                    continue
                grants.append(Grant(resource, Permission[permission.upper()]))
            roles.append(Role(name, tuple(grants), inherits))
        if problems:
            raise AuthConfigError(problems)
        try:
            return cls(roles)
        except AuthConfigError as e:
            raise AuthConfigError(f"{where}: {p}" for p in e.problems) from None

    @classmethod
    def load(cls, path: str) -> RBACPolicy:
        """The built-in roles plus those of the roles file at ``path``."""
        return cls.from_data(read_structured_file(path, "auth.roles_file"))


__all__ = [
    "BUILTIN_ROLES",
    "SERVER",
    "Access",
    "Grant",
    "Permission",
    "RBACPolicy",
    "Role",
    "check_pattern",
    "collection_resource",
    "required_access",
]
