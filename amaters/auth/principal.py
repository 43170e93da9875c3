"""Principals (the avatars a login yields), the credentials the checkers accept, and login errors.

A checker answers a successful login with a :class:`Principal` as its avatar id; the realm hands
it back with a ``logout`` callable attached, which the protocol calls when the connection ends.

Login failures are :class:`~twisted.cred.error.UnauthorizedLogin` (the cred convention); the
subclasses here say *why*, so the authenticator can answer ``AUTH_EXPIRED`` or
``AUTH_INVALID_CERTIFICATE`` instead of ``AUTH_FAILED``, and audit a ``security_violation`` for
attacks such as an ``alg: none`` token.  Their messages are shown to the client and written to the
log and the audit log: they never contain a secret.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import Attribute, implementer

from amaters.errors import AuthError
from amaters.interfaces import IPrincipal

#: Values of ``IPrincipal.auth_method``.
AUTH_JWT = "jwt"
AUTH_API_KEY = "api_key"
AUTH_MTLS = "mtls"
AUTH_ANONYMOUS = "anonymous"


@implementer(IPrincipal)
@attrs.frozen
class Principal:
    """An authenticated party.

    ``logout`` is set by the realm on the avatar it returns; it is not part of the principal's
    identity (ignored by ``==`` and ``repr``).
    """

    id: str
    name: str
    roles: tuple[str, ...]
    auth_method: str
    logout: Callable[[], None] | None = attrs.field(default=None, eq=False, repr=False)


#: Who a request runs as when ``auth.enabled`` is false (loopback and trusted networks only).
ANONYMOUS = Principal(id="anonymous", name="anonymous", roles=("admin",), auth_method=AUTH_ANONYMOUS)


@attrs.frozen
class Credentials:
    """What a client presented, as a front end read it (a handshake, gRPC metadata, an HTTP header).

    The secret never appears in ``repr``.
    """

    kind: str  # "bearer_token" | "api_key"
    secret: str = attrs.field(repr=False)


#: ``authenticate(credentials, peer_certificate, source_address) -> Deferred[IPrincipal]``; fails
#: with an AuthError subclass to refuse.  Every front end logs in through one of these.
Authenticator = Callable[[Credentials | None, Any, str], "defer.Deferred[IPrincipal]"]


def default_authenticator(auth_enabled: bool) -> Authenticator:
    """Without a cred portal: anonymous admin when auth is disabled, else refuse every login."""

    def anonymous(
        credentials: Credentials | None, peer_certificate: Any, source: str
    ) -> defer.Deferred[IPrincipal]:
        return defer.succeed(ANONYMOUS)

    def refuse(
        credentials: Credentials | None, peer_certificate: Any, source: str
    ) -> defer.Deferred[IPrincipal]:
        return defer.fail(
            AuthError("authentication is enabled but no authentication method is configured on this server")
        )

    return refuse if auth_enabled else anonymous


# -- credentials ---------------------------------------------------------------------------------


class IBearerToken(ICredentials):
    """A JWT presented as a bearer token."""

    token = Attribute("The compact JWT (str).")


class IAPIKey(ICredentials):
    """An API key, ``<id>.<secret>`` when made by ``amaters auth new-key``."""

    key = Attribute("The whole key (str).")


class IClientCertificate(ICredentials):
    """The certificate a client presented in the TLS handshake."""

    certificate = Attribute("The leaf certificate (cryptography.x509.Certificate).")
    chain = Attribute("Further certificates the client sent (tuple, may be empty): untrusted.")


@implementer(IBearerToken)
@attrs.frozen
class BearerToken:
    """A bearer token from the handshake (never shown in ``repr``)."""

    token: str = attrs.field(repr=False)


@implementer(IAPIKey)
@attrs.frozen
class APIKey:
    """An API key from the handshake (never shown in ``repr``)."""

    key: str = attrs.field(repr=False)


@implementer(IClientCertificate)
@attrs.frozen
class ClientCertificate:
    """The certificate a client presented, and the chain it came with."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()


# -- login failures ------------------------------------------------------------------------------


class ExpiredCredentials(UnauthorizedLogin):
    """The credentials were valid once: an expired token or API key (``AUTH_EXPIRED``)."""


class CertificateRejected(UnauthorizedLogin):
    """The client certificate is not acceptable (``AUTH_INVALID_CERTIFICATE``)."""


class SecurityViolation(UnauthorizedLogin):
    """A login that looks like an attack (``alg: none``, an algorithm/key-type confusion).

    Answered like any failed login, and audited as a ``security_violation``.
    """


def login_failure_message(error: UnauthorizedLogin) -> str:
    """The client-safe text of a login failure (checkers only put safe text in them)."""
    if error.args and isinstance(error.args[0], str) and error.args[0]:
        return error.args[0]
    return "authentication failed"


__all__ = [
    "ANONYMOUS",
    "AUTH_ANONYMOUS",
    "AUTH_API_KEY",
    "AUTH_JWT",
    "AUTH_MTLS",
    "APIKey",
    "Authenticator",
    "BearerToken",
    "CertificateRejected",
    "ClientCertificate",
    "Credentials",
    "ExpiredCredentials",
    "IAPIKey",
    "IBearerToken",
    "IClientCertificate",
    "Principal",
    "SecurityViolation",
    "default_authenticator",
    "login_failure_message",
]
