"""TLS context factories for the native protocol, server and client.

Both sides use Twisted's :class:`~twisted.internet.ssl.CertificateOptions` (TLS 1.2 at least, ALPN
``amaters/1``).  TLS 1.3 is preferred and uses OpenSSL's suites (all AEAD); TLS 1.2 is restricted to
:data:`TLS12_CIPHERS`: ECDHE key exchange (forward secrecy) with AES-GCM or ChaCha20-Poly1305, so no
CBC suite (LUCKY13-style padding oracles) and no static RSA key exchange is ever negotiated.  The server side is wrapped in :class:`ReloadableServerTLS`, the
connection creator handed to ``TLSMemoryBIOFactory``: reload swaps the options inside it, so new
connections use new certificates while existing ones keep theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    ITransport,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from amaters.errors import InvalidCertificate
from amaters.interfaces import IReadScope

#: The ALPN protocol id of the native protocol.
ALPN_PROTOCOL = b"amaters/1"

#: TLS 1.2 cipher suites (OpenSSL syntax): ECDHE with AEAD only.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def acceptable_ciphers() -> ssl.AcceptableCiphers:
    """The TLS 1.2 suites both sides offer (:data:`TLS12_CIPHERS`)."""
    return ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS)


def _split_pem_certificates(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    parts = []
    for block in pem.split(marker):
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start != -1:
            parts.append(block[start:] + marker + b"\n")
    return parts


def load_certificates(path: str | Path) -> list[ssl.Certificate]:
    """Every certificate in a PEM file, in file order (leaf first for a chain)."""
    data = Path(path).read_bytes()
    blocks = _split_pem_certificates(data)
    if not blocks:
        raise InvalidCertificate(f"{path}: no PEM certificate found")
    return [ssl.Certificate.loadPEM(block) for block in blocks]


def load_trust_root(path: str | Path) -> IOpenSSLTrustRoot:
    """Trust exactly the CA certificates in a PEM bundle."""
    certificates = load_certificates(path)
    return ssl.trustRootFromCertificates(certificates)


def server_tls_options(
    cert_file: str | Path,
    key_file: str | Path,
    *,
    client_ca: str | Path | None = None,
    client_auth: Literal["none", "optional", "required"] = "none",
    crl: str | Path | None = None,
) -> ssl.CertificateOptions:
    """Server options: the certificate chain in ``cert_file`` (leaf first) and its key.

    With ``client_auth`` "optional" or "required", client certificates are verified against
    ``client_ca``; "required" refuses a TLS handshake without one.  With ``crl`` (PEM, one or more
    CRLs), a client certificate is also checked for revocation: its issuer must have a current CRL
    in the file, or the handshake fails (OpenSSL's CRL_CHECK).
    """
    chain = load_certificates(cert_file)
    key = ssl.KeyPair.load(Path(key_file).read_bytes(), crypto.FILETYPE_PEM)
    extra: dict[str, object] = {}
    if client_auth != "none":
        if not client_ca:
            raise ValueError("client certificate verification needs a CA file")
        if client_auth == "required":
            extra["trustRoot"] = load_trust_root(client_ca)  # implies verify + require
        else:
            # Twisted refuses trustRoot with requireCertificate=False; the older arguments express
            # "verify a certificate if one is offered".
            extra["verify"] = True
            extra["caCerts"] = [c.original for c in load_certificates(client_ca)]
            extra["requireCertificate"] = False
    options = ssl.CertificateOptions(
        privateKey=key.original,
        certificate=chain[0].original,
        extraCertChain=[c.original for c in chain[1:]],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=acceptable_ciphers(),
        acceptableProtocols=[ALPN_PROTOCOL],
        **extra,  # type: ignore[arg-type]
    )
    if crl and client_auth != "none":
        _install_crls(options, crl)
    return options


def load_crls(path: str | Path) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file."""
    data = Path(path).read_bytes()
    marker = b"-----END X509 CRL-----"
    crls = []
    for block in data.split(marker):
        start = block.find(b"-----BEGIN X509 CRL-----")
        if start != -1:
            crls.append(x509.load_pem_x509_crl(block[start:] + marker + b"\n"))
    if not crls:
        raise InvalidCertificate(f"{path}: no PEM CRL found")
    return crls


def _install_crls(options: ssl.CertificateOptions, path: str | Path) -> None:
    # CertificateOptions builds its context once and keeps it: the CRLs added to that context's
    # store apply to every connection made with these options.
    store = options.getContext().get_cert_store()
    assert store is not None
    for crl in load_crls(path):
        store.add_crl(crl)
    store.set_flags(crypto.X509StoreFlags.CRL_CHECK)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """A server connection creator whose options can be swapped (certificate reload).

    Each new connection takes the options current at accept time; connections already open keep
    the context they were created with.
    """

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self.options = options

    def swap(self, options: ssl.CertificateOptions) -> None:
        """Use ``options`` for connections accepted from now on."""
        options.getContext()  # fail here, not on the next accept, if the new material is bad
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.options.getContext(), None)


#: Plaintext of the largest TLS record: a read of more than this many bytes holds several records.
_RECORD_BYTES = 16384


class ReadScopedTLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's TLS transport, which tells a protocol providing :class:`IReadScope` where a read
    from the socket that holds several TLS records begins and ends.

    Each record is delivered through the protocol's ``dataReceived`` as soon as it is decrypted;
    a protocol that writes its answers at the end of each delivery would otherwise encrypt and
    send once per record (four times for 64 KiB of pipelined requests), and account for them as
    often.  Reads of at most one record's size pass straight through.
    """

    _scope: IReadScope | None = None

    def makeConnection(self, transport: ITransport) -> None:
        wrapped = self.wrappedProtocol
        self._scope = wrapped if IReadScope.providedBy(wrapped) else None
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        scope = self._scope
        if scope is None or len(data) <= _RECORD_BYTES:
            super().dataReceived(data)
            return
        scope.readStarted()
        try:
            super().dataReceived(data)
        finally:
            scope.readFinished()


class BatchedWritesTLSFactory(TLSMemoryBIOFactory):
    """TLS for a protocol that already writes its answers in one piece per read.

    Twisted's default TLS transport holds every write until the next reactor iteration (a timer
    per write) so that many small writes become one TLS record.  The native protocol joins the
    answers of one read itself and writes once, so that wait only costs a timer, a heap push and
    pop and one more trip round the reactor per answer: this factory's connections encrypt and
    send each write at once.  Protocols that write in many small pieces (HTTP) keep Twisted's
    default.

    Its connections also tell a protocol that provides :class:`~amaters.interfaces.IReadScope`
    where a read holding several TLS records begins and ends (:class:`ReadScopedTLSProtocol`).
    """

    protocol = ReadScopedTLSProtocol

    def __init__(self, creator: IOpenSSLServerConnectionCreator, wrapped: IProtocolFactory) -> None:
        super().__init__(creator, False, wrapped)


def client_tls_options(
    hostname: str,
    ca_file: str | Path | None,
    *,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
) -> IOpenSSLClientConnectionCreator:
    """Client options verifying the server's certificate for ``hostname`` (a name or an IP).

    ``ca_file`` None trusts the platform's CA store.  ``client_cert``/``client_key`` present a client
    certificate (mutual TLS); the key may be in ``client_cert`` itself.
    """
    trust = load_trust_root(ca_file) if ca_file else ssl.platformTrust()
    client_certificate = None
    if client_cert:
        cert_pem = Path(client_cert).read_bytes()
        key_pem = Path(client_key).read_bytes() if client_key else cert_pem
        client_certificate = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=trust,
        clientCertificate=client_certificate,
        acceptableProtocols=[ALPN_PROTOCOL],
        extraCertificateOptions={
            "raiseMinimumTo": ssl.TLSVersion.TLSv1_2,
            "acceptableCiphers": acceptable_ciphers(),
        },
    )
