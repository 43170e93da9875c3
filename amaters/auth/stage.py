"""The pipeline stages that enforce RBAC on every request and write the request audit trail.

- :class:`AuthorizationStage` (``rbac``), right after the admission stages (load shedding, rate
  limits): refuses a request its principal's roles do not allow with
  ``AUTH_INSUFFICIENT_PERMISSIONS`` naming the operation and resource, and audits the denial.  It
  runs before any other work (value compression, the cache, the executor), so a cached answer is
  never served to a principal who may not read it.  Given the storage backend (``collections``), it
  also refuses a SET (or a BATCH) that would create a collection, by writing to one that does not
  exist yet, unless the principal has ``create`` on it; and answers LIST_COLLECTIONS with only the
  collections the principal may read.
- :class:`AuditStage` (``audit``): after each request, audits admin operations (success or
  failure), writes (when ``audit.log_writes``), reads (only when ``audit.log_reads``), and every
  failed request.  Denials were audited by the RBAC stage already.

Audit events name the operation and the resource, never a key or a value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from amaters.auth.audit import audit_event
from amaters.auth.rbac import SERVER, Access, Permission, RBACPolicy, collection_resource, required_access
from amaters.config import AuditConfig
from amaters.errors import AmatersError, PermissionDenied
from amaters.interfaces import IAuditSink
from amaters.query import operations as ops
from amaters.query.pipeline import PipelineStage, RequestContext

#: ``ctx.annotations`` key set on a request the RBAC stage refused.
DENIED = "auth.denied"


class AuthorizationStage(PipelineStage):
    """Deny by default: a request runs only when the principal's roles grant all it needs.

    ``policy`` may be replaced at any time (a reload); requests use the one current when they
    arrive.
    """

    name = "rbac"

    def __init__(self, policy: RBACPolicy, audit: IAuditSink, collections: Any = None) -> None:
        self.policy = policy
        self.audit = audit
        #: The storage backend (``has_collection``, ``list_collections``), or None: then neither
        #: auto-creation nor listings are checked here.
        self.collections = collections

    def before(self, ctx: RequestContext, op: Any) -> object:
        principal = ctx.principal
        roles = principal.roles
        missing = self.policy.denial(roles, op)
        if missing is None:
            collections = self.collections
            if collections is None:
                return None
            kind = type(op)
            if kind is ops.Set:
                if collections.has_collection(op.collection):
                    return None  # the collection exists: nothing to create (most writes)
                missing = self._creation_denied(roles, (op.collection,))
            elif kind is ops.Batch:
                missing = self._creation_denied(
                    roles,
                    sorted(
                        {item.collection for item in op.ops if type(item) is ops.Set}
                        - {name for name in op.collections if collections.has_collection(name)}
                    ),
                )
            elif kind is ops.ListCollections:
                return defer.Deferred.fromCoroutine(self._list_readable(ctx, roles, collections))
            else:
                return None
            if missing is None:
                return None
        self._deny(ctx, missing)
        return None  # not reached: _deny raises

    def before_many(self, items: list[tuple[RequestContext, Any]]) -> object:
        """:meth:`before` for the keyed requests of one read, the decision for one request reused
        for the next ones of the same principal, kind and collection (nothing any of them does
        can change it: none has run yet)."""
        refusals: list[AmatersError | None] | None = None
        # The last request let through: its principal, kind and collection (None: none yet).
        principal: Any = None
        kind: Any = None
        collection = ""
        for index, (ctx, op) in enumerate(items):
            if ctx.principal is principal and type(op) is kind and op.collection == collection:
                continue
            try:
                self.before(ctx, op)
            except AmatersError as e:
                if refusals is None:
                    refusals = [None] * len(items)
                refusals[index] = e
                principal = kind = None
                continue
            principal, kind, collection = ctx.principal, type(op), op.collection
        return refusals

    def _creation_denied(self, roles: Any, names: Iterable[str]) -> Access | None:
        """What a write that would create the collections ``names`` lacks (None: nothing)."""
        for name in names:
            resource = collection_resource(name)
            if not self.policy.allowed(roles, resource, Permission.CREATE):
                return Access("set (which would create the collection)", resource, Permission.CREATE)
        return None

    async def _list_readable(self, ctx: RequestContext, roles: Any, collections: Any) -> None:
        names = await collections.list_collections()
        policy = self.policy
        ctx.result = [
            name for name in names if policy.allowed(roles, collection_resource(name), Permission.READ)
        ]

    def _deny(self, ctx: RequestContext, missing: Access) -> None:
        principal = ctx.principal
        roles = principal.roles
        shown_roles = ", ".join(roles) if roles else "none"
        error = PermissionDenied(
            f"{principal.name!r} (roles: {shown_roles}) may not {missing.operation} on"
            f" {missing.resource}: it needs {missing.permission.label} permission"
        )
        ctx.annotations[DENIED] = True
        self.audit.emit(
            audit_event(
                # Server administration is audited as "admin" whatever its outcome.
                "admin"
                if missing.resource == SERVER and missing.permission is Permission.ADMIN
                else "authorization",
                "denied",
                principal=principal.id,
                auth_method=principal.auth_method,
                action=missing.operation,
                resource=missing.resource,
                source=ctx.source,
                error=f"{error.code.name}: {error.message}",
            )
        )
        raise error


#: What a (non-batch) operation's ``kind`` needs; other kinds take the general path.
_KIND_PERMISSION = {
    "read": Permission.READ,
    "write": Permission.WRITE,
    "create": Permission.CREATE,
    "admin": Permission.ADMIN,
}


def _needed_permission(op: Any) -> Permission:
    """The highest permission ``op`` needs: ``max`` over :func:`required_access`, without building
    the :class:`Access` tuple for a single operation (every request asks)."""
    if getattr(op, "name", None) != "batch":
        kind = getattr(op, "kind", "")
        permission = _KIND_PERMISSION.get(kind) if isinstance(kind, str) else None
        if permission is not None:
            return permission
    return max((access.permission for access in required_access(op)), default=Permission.ADMIN)


def _resource(op: Any) -> str:
    resources = list(dict.fromkeys(access.resource for access in required_access(op)))
    return ",".join(resources) if resources else "server"


class AuditStage(PipelineStage):
    """Audits what requests did: admin operations, writes, failures, and reads when asked to.

    ``settings`` (``[audit]``) may be replaced at any time (a reload): while ``audit.enabled`` is
    false the stage is inactive and the pipeline does not call it.
    """

    name = "audit"

    def __init__(self, audit: IAuditSink, settings: AuditConfig) -> None:
        self.audit = audit
        self._settings = settings
        self._watchers: list[Callable[[], None]] = []

    @property
    def settings(self) -> AuditConfig:
        return self._settings

    @settings.setter
    def settings(self, settings: AuditConfig) -> None:
        changed = settings.enabled != self._settings.enabled
        self._settings = settings
        if changed:
            for watcher in self._watchers:
                watcher()

    @property
    def active(self) -> bool:
        return self._settings.enabled

    def watch_active(self, watcher: Callable[[], None]) -> None:
        """The pipeline re-reads :attr:`active` when a reload turns the audit log on or off."""
        self._watchers.append(watcher)

    def after(self, ctx: RequestContext, op: Any, outcome: object) -> None:
        if ctx.annotations.get(DENIED):
            return
        needs = _needed_permission(op)
        failed = isinstance(outcome, Failure)
        if not failed:
            if needs is Permission.READ and not self.settings.log_reads:
                return
            if needs is Permission.WRITE and not self.settings.log_writes:
                return
        error = None
        if failed:
            assert isinstance(outcome, Failure)
            value = outcome.value
            if isinstance(value, AmatersError):
                error = f"{value.code.name}: {value.message}"
            else:
                error = "internal error"
        principal = ctx.principal
        self.audit.emit(
            audit_event(
                "admin" if needs is Permission.ADMIN else "authorization",
                "failure" if failed else "success",
                principal=principal.id,
                auth_method=principal.auth_method,
                action=str(getattr(op, "name", type(op).__name__)),
                resource=_resource(op),
                source=ctx.source,
                error=error,
            )
        )


__all__ = ["DENIED", "AuditStage", "AuthorizationStage"]
