"""The ``auth`` service: login (the cred portal, the throttle) and authorization (the RBAC stage).

:class:`AuthService` reads keys, API keys and roles when it starts (not while the tree is built),
builds ``Portal(AmatersRealm(), checkers)`` and holds the throttle and the two pipeline stages the
composition root puts in the pipeline: ``rbac`` (:class:`~amaters.auth.stage.AuthorizationStage`)
and ``audit`` (:class:`~amaters.auth.stage.AuditStage`).  With ``auth.enabled`` its
:meth:`AuthService.authenticate` is the login every front end uses.  :meth:`AuthService.prepare_reload`
applies reloaded roles, API keys, JWT keys, throttle and audit settings all at once, or none of
them.
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

    def __init__(
        self, config: Config, clock: IReactorTime, audit: AuditService, collections: Any = None
    ) -> None:
        """``collections`` is the storage backend: the RBAC stage checks collection creation and
        filters listings with it (None: it does neither)."""
        self.config = config
        self.clock = clock
        self.audit = audit
        self.realm = AmatersRealm()
        self.throttle = AuthThrottle(clock, config.auth.max_failures_per_minute)
        self.authorization = AuthorizationStage(RBACPolicy(), audit, collections)
        self.audit_stage = AuditStage(audit, config.audit)
        self.authenticator: PortalAuthenticator | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
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
        """The login every front end uses when auth is enabled (an :data:`Authenticator`)."""
        authenticator = self.authenticator
        if authenticator is None:
            return defer.fail(Unavailable("the server is starting; try again"))
        return authenticator(credentials, peer_certificate, source)

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

        return commit

    def reload(self, config: Config) -> None:
        """Apply reloaded auth and audit settings now, all or nothing (raises ConfigError)."""
        self.prepare_reload(self.config, config)()


__all__ = ["AuthService", "build_checkers"]
