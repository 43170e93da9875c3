"""The realm, the portal, and the authenticator the protocol calls during a handshake.

``PortalAuthenticator(credentials, peer_certificate, source)`` is the protocol's ``Authenticator``
(:mod:`amaters.protocols.server`): it turns what the handshake carried into cred credentials,
logs in through ``Portal(AmatersRealm(), checkers)`` and fires with the avatar, a
:class:`~amaters.auth.principal.Principal` whose ``logout`` the protocol calls on disconnect.

- A bearer token or an API key in the handshake is checked as such.  Without either, the client
  certificate verified in the TLS handshake (mTLS) is the credential.  Credentials in the
  handshake win over a certificate, and a failed token is not retried with the certificate.
- Nothing at all: refused with ``AUTH_FAILED`` (auth is enabled whenever this authenticator is).
- Expected login failures (``UnauthorizedLogin`` and its subclasses, unhandled credential types)
  become ``AuthError`` (``AUTH_FAILED``), ``AuthExpired`` or ``InvalidCertificate`` with a safe
  message; anything else is logged with its traceback and answered with a generic
  ``AUTH_FAILED``.
- Each failure counts against the source's network and the credential presented
  (:mod:`amaters.auth.throttle`); a throttled login is refused before its credentials are checked,
  except that a credential that logged in before is not locked out by its network's failures.
- Every outcome is audited (``authentication``; ``security_violation`` for refused algorithms and
  throttled addresses).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from amaters.auth.audit import audit_event
from amaters.auth.certs import client_certificate_from_peer
from amaters.auth.principal import (
    APIKey,
    BearerToken,
    CertificateRejected,
    ExpiredCredentials,
    Principal,
    SecurityViolation,
    login_failure_message,
)
from amaters.auth.throttle import AuthThrottle, credential_bucket
from amaters.errors import AmatersError, AuthError, AuthExpired, InvalidCertificate
from amaters.interfaces import IAuditSink, IPrincipal

#: Handshake credential kinds (``Credentials.kind`` in the protocol): cred credentials, auth method.
_CREDENTIALS: dict[str, tuple[Callable[[str], ICredentials], str]] = {
    "bearer_token": (BearerToken, "jwt"),
    "api_key": (APIKey, "api_key"),
}
_METHOD_NAMES = {"jwt": "bearer tokens", "api_key": "API keys", "mtls": "client certificates"}


@implementer(IRealm)
class AmatersRealm:
    """Hands out the principal a checker vouched for, with a ``logout`` that is safe to call twice.

    ``active`` counts the sessions logged in and not yet logged out, per (auth method, principal id).
    """

    def __init__(self) -> None:
        self.active: collections.Counter[tuple[str, str]] = collections.Counter()

    def requestAvatar(
        self, avatarId: Any, mind: object, *interfaces: Any
    ) -> tuple[Any, IPrincipal, Callable[[], None]]:
        if IPrincipal not in interfaces:
            raise NotImplementedError("amaters avatars provide only IPrincipal")
        if not isinstance(avatarId, Principal):
            raise TypeError(f"amaters checkers answer with a Principal, not {type(avatarId).__name__}")
        key = (avatarId.auth_method, avatarId.id)
        self.active[key] += 1
        done = False

        def logout() -> None:
            nonlocal done
            if done:
                return
            done = True
            self.active[key] -= 1
            if self.active[key] <= 0:
                del self.active[key]

        return IPrincipal, attrs.evolve(avatarId, logout=logout), logout

    @property
    def session_count(self) -> int:
        """Sessions logged in and not yet logged out."""
        return sum(self.active.values())


def build_portal(
    checkers: Iterable[ICredentialsChecker], realm: AmatersRealm | None = None
) -> tuple[Portal, AmatersRealm]:
    """``Portal(realm, checkers)`` (a new AmatersRealm unless one is given) and its realm."""
    realm = realm if realm is not None else AmatersRealm()
    return Portal(realm, list(checkers)), realm


class PortalAuthenticator:
    """The protocol's authenticate hook over a cred portal, with throttling and audit.

    ``methods`` names the configured login methods, for the message refusing an anonymous client.
    """

    _log = Logger()

    def __init__(
        self,
        portal: Portal,
        throttle: AuthThrottle,
        audit: IAuditSink,
        methods: Iterable[str] = (),
    ) -> None:
        self.portal = portal
        self.throttle = throttle
        self.audit = audit
        self.methods = tuple(methods)

    def __call__(self, credentials: Any, peer_certificate: Any, source: str) -> defer.Deferred[IPrincipal]:
        return defer.Deferred.fromCoroutine(self.login(credentials, peer_certificate, source))

    async def login(self, credentials: Any, peer_certificate: Any, source: str) -> IPrincipal:
        """Log in with handshake ``credentials`` (kind, secret) or the verified ``peer_certificate``."""
        bucket = credential_bucket(credentials)
        try:
            self.throttle.check(source, bucket)
        except AuthError as e:
            self._audit("security_violation", "denied", source, None, e.message)
            raise
        cred, method = self._credentials(credentials, peer_certificate, source)
        try:
            result: Any = await self.portal.login(cred, None, IPrincipal)
        except Exception:
            raise self._failed(Failure(), method, source, bucket) from None
        principal: IPrincipal = result[1]
        self.throttle.record_success(bucket)
        self.audit.emit(
            audit_event(
                "authentication",
                "success",
                principal=principal.id,
                auth_method=principal.auth_method,
                action="login",
                resource="server",
                source=source,
            )
        )
        return principal

    def _credentials(self, credentials: Any, peer_certificate: Any, source: str) -> tuple[ICredentials, str]:
        if credentials is not None:
            kind = getattr(credentials, "kind", None)
            known = _CREDENTIALS.get(kind) if isinstance(kind, str) else None
            if known is None:
                error = AuthError("unsupported credentials in the handshake")
                self._audit("authentication", "failure", source, None, error.message)
                raise error
            make, method = known
            return make(getattr(credentials, "secret", "")), method
        try:
            certificate = client_certificate_from_peer(peer_certificate)
        except TypeError:
            self._log.failure("Unexpected peer certificate type from the transport")
            certificate = None
        if certificate is not None:
            return certificate, "mtls"
        wanted = " or ".join(self.methods) or "credentials"
        error = AuthError(f"authentication required: present {wanted}")
        self._audit("authentication", "failure", source, "anonymous", error.message)
        raise error

    def _failed(self, failure: Failure, method: str, source: str, bucket: str | None = None) -> AmatersError:
        value = failure.value
        if isinstance(value, UnhandledCredentials):
            error: AmatersError = AuthError(f"{_METHOD_NAMES[method]} are not accepted by this server")
        elif isinstance(value, ExpiredCredentials):
            error = AuthExpired(login_failure_message(value))
        elif isinstance(value, CertificateRejected):
            error = InvalidCertificate(login_failure_message(value))
        elif isinstance(value, UnauthorizedLogin):
            error = AuthError(login_failure_message(value))
        else:
            self._log.failure("Login failed unexpectedly for {source}", failure, source=source)
            error = AuthError("authentication failed")
            self._audit("authentication", "failure", source, method, "internal error during login")
            return error
        event_type = "security_violation" if isinstance(value, SecurityViolation) else "authentication"
        self._audit(event_type, "failure", source, method, f"{error.code.name}: {error.message}")
        self.throttle.record_failure(source, bucket)
        if self.throttle.retry_after(source) is not None:
            self._log.warn(
                "Throttling logins from {source}: {limit} failures within a minute",
                source=source,
                limit=self.throttle.limit,
            )
        return error

    def _audit(self, event_type: str, result: str, source: str, method: str | None, error: str) -> None:
        self.audit.emit(
            audit_event(
                event_type,
                result,
                auth_method=method,
                action="login",
                resource="server",
                source=source,
                error=error,
            )
        )


__all__ = ["AmatersRealm", "PortalAuthenticator", "build_portal"]
