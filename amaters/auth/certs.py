"""Client certificates (mutual TLS): :class:`ClientCertChecker`, a ``twisted.cred`` checker.

OpenSSL verifies a client's certificate during the TLS handshake when ``tls.client_auth`` is
``optional`` or ``required``: chain to a CA in ``tls.ca``, validity dates, the client-auth purpose,
and revocation against ``tls.crl`` when one is configured (see
:func:`amaters.tls.context.server_tls_options`).  The checker verifies the certificate again,
with OpenSSL and the same CA and CRL files, against the reactor's clock: it does not rely on how
the transport it came from was configured, and a certificate that expired while its connection was
being set up is still refused.

Then it maps the certificate to a principal:

- identity: the subject's common name (CN), else the first subject alternative name (an e-mail
  address, then a DNS name, then a URI);
- ``auth.mtls.allowed_organizations``: when not empty, the subject's organization (O) must be one
  of them;
- roles: ``auth.mtls.role_map`` entries ``"id:<identity>"`` and ``"org:<organization>"``; a holder
  gets the roles of both (none matching: no roles, so every request is denied).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from amaters.auth.files import AuthConfigError
from amaters.auth.principal import (
    AUTH_MTLS,
    CertificateRejected,
    ClientCertificate,
    IClientCertificate,
    Principal,
)
from amaters.config import MTLSConfig

_CRL_BEGIN = b"-----BEGIN X509 CRL-----"
T = TypeVar("T")

_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"


def _pem_blocks(data: bytes, begin: bytes) -> list[bytes]:
    end = begin.replace(b"BEGIN", b"END")
    blocks = []
    start = data.find(begin)
    while start != -1:
        stop = data.find(end, start)
        if stop == -1:
            break
        blocks.append(data[start : stop + len(end)] + b"\n")
        start = data.find(begin, stop)
    return blocks


def _load_pem_objects(
    path: str, key: str, begin: bytes, load: Callable[[bytes], T], what: str, problems: list[str]
) -> list[T]:
    """Every PEM block starting with ``begin`` in ``path``, loaded; problems go to ``problems``."""
    try:
        data = Path(path).read_bytes()
        return [load(block) for block in _pem_blocks(data, begin)]
    except OSError as e:
        problems.append(f"{key}: cannot read {path!r} ({e.strerror or type(e).__name__})")
    except ValueError:
        problems.append(f"{key}: {path!r} holds a {what} that cannot be parsed")
    return []


class CertificateVerifier:
    """Verifies a certificate chain with OpenSSL against CA certificates and optional CRLs.

    With CRLs, the leaf's issuer must have a CRL among them (OpenSSL's ``CRL_CHECK``): a missing or
    expired CRL refuses the certificate rather than skipping the revocation check.
    """

    def __init__(
        self, authorities: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList] = ()
    ) -> None:
        if not authorities:
            raise ValueError("a certificate verifier needs at least one CA certificate")
        self.authorities = tuple(authorities)
        self.crls = tuple(crls)

    @classmethod
    def from_files(cls, ca_file: str, crl_file: str = "") -> CertificateVerifier:
        """The verifier for PEM files ``tls.ca`` and ``tls.crl``.  Raises AuthConfigError."""
        problems: list[str] = []
        authorities = _load_pem_objects(
            ca_file, "tls.ca", _CERT_BEGIN, x509.load_pem_x509_certificate, "certificate", problems
        )
        if not authorities and not problems:
            problems.append(f"tls.ca: {ca_file!r} holds no PEM certificate")
        crls: list[x509.CertificateRevocationList] = []
        if crl_file:
            crls = _load_pem_objects(crl_file, "tls.crl", _CRL_BEGIN, x509.load_pem_x509_crl, "CRL", problems)
            if not crls and not problems:
                problems.append(f"tls.crl: {crl_file!r} holds no PEM CRL (-----BEGIN X509 CRL-----)")
        if problems:
            raise AuthConfigError(problems)
        return cls(authorities, crls)

    def verify(
        self, leaf: x509.Certificate, chain: Sequence[x509.Certificate], when: datetime.datetime
    ) -> None:
        """Raise :class:`CertificateRejected` unless ``leaf`` chains to a CA, valid at ``when``.

        ``chain`` holds untrusted intermediates the client sent.
        """
        store = crypto.X509Store()
        for authority in self.authorities:
            store.add_cert(crypto.X509.from_cryptography(authority))
        if self.crls:
            for crl in self.crls:
                store.add_crl(crl)
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        store.set_time(when)
        context = crypto.X509StoreContext(
            store,
            crypto.X509.from_cryptography(leaf),
            [crypto.X509.from_cryptography(c) for c in chain],
        )
        try:
            context.verify_certificate()
        except crypto.X509StoreContextError as e:
            raise CertificateRejected(f"client certificate rejected: {e}") from None


def client_certificate_from_peer(peer: Any) -> ClientCertificate | None:
    """Credentials for what a TLS transport reports as the peer's certificate.

    Accepts a pyOpenSSL ``X509``, a ``cryptography`` certificate, or a sequence of either (leaf
    first, then the intermediates the client sent); None or an empty sequence gives None.
    """
    if peer is None:
        return None
    items = list(peer) if isinstance(peer, (list, tuple)) else [peer]
    certificates = []
    for item in items:
        if isinstance(item, crypto.X509):
            certificates.append(item.to_cryptography())
        elif isinstance(item, x509.Certificate):
            certificates.append(item)
        else:
            raise TypeError(f"not a certificate: {type(item).__name__}")
    if not certificates:
        return None
    return ClientCertificate(certificates[0], tuple(certificates[1:]))


def _attribute_values(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    values = []
    for attribute in name.get_attributes_for_oid(oid):
        value = attribute.value
        values.append(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return values


def certificate_identity(certificate: x509.Certificate) -> str | None:
    """The CN, else the first e-mail, DNS or URI subject alternative name; None when there is none."""
    for cn in _attribute_values(certificate.subject, NameOID.COMMON_NAME):
        if cn:
            return cn
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for kind in (x509.RFC822Name, x509.DNSName, x509.UniformResourceIdentifier):
        names = san.get_values_for_type(kind)
        if names:
            return str(names[0])
    return None


def _allows_client_auth(certificate: x509.Certificate) -> bool:
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no restriction, as OpenSSL treats it
    return ExtendedKeyUsageOID.CLIENT_AUTH in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages


@implementer(ICredentialsChecker)
class ClientCertChecker:
    """Checks :class:`~amaters.auth.principal.IClientCertificate` credentials.

    The avatar id is a Principal with ``auth_method`` ``"mtls"``; failures are
    ``CertificateRejected`` with a client-safe reason.
    """

    credentialInterfaces = (IClientCertificate,)

    def __init__(self, verifier: CertificateVerifier, settings: MTLSConfig, clock: IReactorTime) -> None:
        self.verifier = verifier
        self.clock = clock
        self.allowed_organizations = frozenset(settings.allowed_organizations)
        self.identity_roles: dict[str, tuple[str, ...]] = {}
        self.organization_roles: dict[str, tuple[str, ...]] = {}
        for key, roles in settings.role_map.items():
            kind, _, value = key.partition(":")
            table = self.identity_roles if kind == "id" else self.organization_roles
            table[value] = tuple(roles)

    def requestAvatarId(self, credentials: IClientCertificate) -> defer.Deferred[Principal]:  # type: ignore[override]
        # cred types avatar ids as bytes; ours is the Principal, as roles come with the credentials.
        try:
            return defer.succeed(self.verify(credentials.certificate, tuple(credentials.chain)))
        except UnauthorizedLogin:
            return defer.fail()

    def verify(self, certificate: x509.Certificate, chain: Sequence[x509.Certificate] = ()) -> Principal:
        """The principal ``certificate`` identifies, or ``CertificateRejected``."""
        when = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)
        self.verifier.verify(certificate, chain, when)
        if not _allows_client_auth(certificate):
            raise CertificateRejected(
                "client certificate rejected: it is not meant for client authentication"
            )
        identity = certificate_identity(certificate)
        if identity is None:
            raise CertificateRejected(
                "client certificate rejected: it names no CN or subject alternative name"
            )
        organizations = _attribute_values(certificate.subject, NameOID.ORGANIZATION_NAME)
        if self.allowed_organizations and not self.allowed_organizations.intersection(organizations):
            raise CertificateRejected("client certificate rejected: its organization is not allowed")
        roles = list(self.identity_roles.get(identity, ()))
        for organization in organizations:
            roles += self.organization_roles.get(organization, ())
        return Principal(
            id=identity,
            name=identity,
            roles=tuple(dict.fromkeys(roles)),
            auth_method=AUTH_MTLS,
        )


__all__ = [
    "CertificateVerifier",
    "ClientCertChecker",
    "certificate_identity",
    "client_certificate_from_peer",
]
