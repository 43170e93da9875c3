"""Wiring: the ``auth`` service and :func:`build_auth`, called by :mod:`amaters.tap`.

``build_auth(config, reactor, root)`` adds two services before the listener:

- ``audit`` (:class:`~amaters.auth.audit.AuditService`): the audit sink, ``root.audit``;
- ``auth`` (:class:`AuthService`): reads keys, API keys and roles when it starts (not while
  wiring), builds ``Portal(AmatersRealm(), checkers)`` and holds the throttle and the pipeline
  stages; ``root.auth``.  With ``auth.enabled`` its :meth:`AuthService.authenticate` is
  ``root.authenticator``, the hook the listener's handshake calls.

``AuthService.install(pipeline, listener)`` (once the listener and its pipeline exist) puts the
RBAC stage first in the pipeline and the audit stage after it, and hands the listener the
authenticator.  :meth:`AuthService.reload` applies reloaded roles, API keys, JWT keys, throttle and
audit settings all at once, or none of them; the ``auth`` service registers itself with
``root.reloader`` (:mod:`amaters.ops.reload`) for that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from amaters.auth.apikeys import APIKeyChecker
from amaters.auth.audit import AuditService
from amaters.auth.certs import ClientCertChecker
from amaters.auth.files import AuthConfigError
from amaters.auth.jwt import JWTChecker
from amaters.auth.rbac import RBACPolicy
from amaters.auth.realm import AmatersRealm, PortalAuthenticator, build_portal
from amaters.auth.settings import AuthMaterial, load_auth_material
from amaters.auth.stage import AuditStage, AuthorizationStage
from amaters.auth.throttle import AuthThrottle
from amaters.config import Config, ConfigError
from amaters.errors import Unavailable
from amaters.interfaces import IPrincipal

#: Stages that admit or refuse requests before anything else (amaters.protect): RBAC follows them.
ADMISSION_STAGES = ("shed", "ratelimit")


def build_checkers(material: AuthMaterial, config: Config, clock: IReactorTime) -> list[ICredentialsChecker]:
    """One checker per configured login method."""
    checkers: list[ICredentialsChecker] = []
    if material.jwt is not None:
        checkers.append(JWTChecker(material.jwt, config.auth.jwt, clock))
    if material.api_keys is not None and material.pepper is not None:
        checkers.append(APIKeyChecker(material.api_keys, material.pepper, clock))
    if material.verifier is not None:
        checkers.append(ClientCertChecker(material.verifier, config.auth.mtls, clock))
    return checkers


class AuthService(service.Service):
    """The ``auth`` service: login (portal, throttle) and authorization (RBAC stage) state."""

    name = "auth"
    _log = Logger()

    def __init__(self, config: Config, clock: IReactorTime, audit: AuditService) -> None:
        self.config = config
        self.clock = clock
        self.audit = audit
        self.realm = AmatersRealm()
        self.throttle = AuthThrottle(clock, config.auth.max_failures_per_minute)
        self.authorization = AuthorizationStage(RBACPolicy(), audit)
        self.audit_stage = AuditStage(audit, config.audit)
        self.authenticator: PortalAuthenticator | None = None
        self.pipeline: Any = None

    # -- lifecycle ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        material = load_auth_material(self.config)  # raises AuthConfigError: the start fails
        self._apply(material, self.config)
        if self.config.auth.enabled:
            self._log.info(
                "Authentication required: {methods}; {roles} role(s)",
                methods=", ".join(material.methods) or "none",
                roles=len(material.policy.roles),
            )

    def _apply(self, material: AuthMaterial, config: Config) -> None:
        # One realm for the life of the process: sessions survive reloads.
        portal, _ = build_portal(build_checkers(material, config, self.clock), self.realm)
        self.authenticator = PortalAuthenticator(portal, self.throttle, self.audit, material.methods)
        self.authorization.policy = material.policy
        self.throttle.update_limit(config.auth.max_failures_per_minute)
        self.audit_stage.settings = config.audit
        self.config = config

    def authenticate(
        self, credentials: Any, peer_certificate: Any, source: str
    ) -> defer.Deferred[IPrincipal]:
        """The listener's authenticate hook (``root.authenticator`` when auth is enabled)."""
        authenticator = self.authenticator
        if authenticator is None:
            return defer.fail(Unavailable("the server is starting; try again"))
        return authenticator(credentials, peer_certificate, source)

    # -- wiring ---------------------------------------------------------------------------------

    def install(self, pipeline: Any, listener: Any = None) -> None:
        """Put the RBAC stage in ``pipeline`` (auth enabled) and the audit stage right after it.

        RBAC goes right after the admission stages (load shedding, rate limits: cheap refusals that
        protect the server) and before every other stage, so no work (value compression, a cache
        lookup, the executor) is done for a request that will be denied.

        With auth enabled, ``listener``'s connections authenticate through :meth:`authenticate`.
        """
        self.pipeline = pipeline
        if self.config.auth.enabled:
            names = [stage.name for stage in pipeline.stages]
            admission = [name for name in names if name in ADMISSION_STAGES]
            if admission:
                pipeline.add_stage(self.authorization, after=admission[-1])
            else:
                pipeline.add_stage(self.authorization, before=names[0] if names else None)
            if listener is not None:
                listener.factory.authenticate = self.authenticate
        self._sync_audit_stage(self.config)

    def _sync_audit_stage(self, config: Config) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            return
        installed = any(stage is self.audit_stage for stage in pipeline.stages)
        if config.audit.enabled and not installed:
            after = self.authorization.name if self.authorization in pipeline.stages else None
            pipeline.add_stage(self.audit_stage, after=after)
        elif not config.audit.enabled and installed:
            pipeline.remove_stage(self.audit_stage.name)

    # -- reload ---------------------------------------------------------------------------------

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None]:
        """Read the auth files ``new`` names; return what applies them (the reloader's protocol).

        Raises ConfigError listing every problem, changing nothing.  Files are read again even
        when their paths did not change: an edited API keys or roles file is the usual reason to
        reload.  ``auth.enabled`` needs a restart and is left alone.
        """
        try:
            material = load_auth_material(new)
        except AuthConfigError as e:
            raise ConfigError(e.problems) from None

        def commit() -> None:
            self.audit.reconfigure(new.audit)
            self._apply(material, new)
            self._sync_audit_stage(new)

        return commit

    def reload(self, config: Config) -> None:
        """Apply reloaded auth and audit settings now, all or nothing (raises ConfigError)."""
        self.prepare_reload(self.config, config)()


def build_auth(config: Config, reactor: Any, root: Any) -> AuthService:
    """Add the ``audit`` and ``auth`` services to ``root`` and attach them (no I/O here).

    Sets ``root.audit`` (the IAuditSink), ``root.auth``, and with ``auth.enabled``
    ``root.authenticator``.
    """
    audit = AuditService(config.audit, config.data_dir, reactor)
    audit.setServiceParent(root)
    auth = AuthService(config, reactor, audit)
    auth.setServiceParent(root)
    root.audit = audit
    root.auth = auth
    if config.auth.enabled:
        root.authenticator = auth.authenticate
    reloader = getattr(root, "reloader", None)
    if reloader is not None:
        reloader.register(auth)
    return auth


__all__ = ["AuthService", "build_auth", "build_checkers"]
