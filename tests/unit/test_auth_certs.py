"""Client certificates: the checker's verification (CA, validity, CRL, purpose) and identity mapping,
and the server's TLS options refusing a foreign certificate in a real (in-memory) TLS handshake."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet import protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from amaters.auth.certs import (
    CertificateVerifier,
    ClientCertChecker,
    certificate_identity,
    client_certificate_from_peer,
)
from amaters.auth.files import AuthConfigError
from amaters.auth.principal import CertificateRejected, ClientCertificate, Principal
from amaters.config import MTLSConfig
from amaters.tls.certs import generate_ca, generate_server_tls, issue_certificate
from amaters.tls.context import ReloadableServerTLS, client_tls_options, server_tls_options

UTC = datetime.UTC


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    ca_key, ca = generate_ca("test client CA")
    other_key, other_ca = generate_ca("someone else's CA")
    return {"ca_key": ca_key, "ca": ca, "other_key": other_key, "other_ca": other_ca}


def clock_at(moment: datetime.datetime | None = None) -> Clock:
    clock = Clock()
    clock.advance((moment or datetime.datetime.now(UTC)).timestamp())
    return clock


def checker(pki: dict[str, Any], settings: MTLSConfig | None = None, **kw: Any) -> ClientCertChecker:
    verifier = CertificateVerifier([pki["ca"]], kw.get("crls", ()))
    return ClientCertChecker(verifier, settings or MTLSConfig(), kw.get("clock") or clock_at())


def client(pki: dict[str, Any], cn: str = "alice", **kw: Any) -> x509.Certificate:
    return issue_certificate(pki["ca_key"], pki["ca"], cn, client=True, **kw)[1]


def revocation_list(
    pki: dict[str, Any], *revoked: x509.Certificate, fresh: bool = True
) -> x509.CertificateRevocationList:
    now = datetime.datetime.now(UTC)
    last = now - datetime.timedelta(hours=1) if fresh else now - datetime.timedelta(days=20)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki["ca"].subject)
        .last_update(last)
        .next_update(last + datetime.timedelta(days=7))
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(last).build()
        )
    return builder.sign(pki["ca_key"], hashes.SHA256())


def test_certificate_from_the_configured_ca_logs_in(pki: dict[str, Any]) -> None:
    """A client certificate issued by the configured CA logs in as its CN, with mapped roles."""
    settings = MTLSConfig(role_map={"id:alice": ["user"], "org:Acme": ["reader", "user"]})
    cert = client(pki, organization="Acme")
    principal = checker(pki, settings).verify(cert)
    assert principal == Principal("alice", "alice", ("user", "reader"), "mtls")
    case = SynchronousTestCase()
    found = case.successResultOf(checker(pki, settings).requestAvatarId(ClientCertificate(cert)))
    assert found.id == "alice"


def test_certificate_from_another_ca_is_refused(pki: dict[str, Any]) -> None:
    """A certificate signed by a CA that is not in tls.ca is refused (AUTH_INVALID_CERTIFICATE)."""
    foreign = issue_certificate(pki["other_key"], pki["other_ca"], "mallory", client=True)[1]
    with pytest.raises(CertificateRejected, match="unable to get local issuer"):
        checker(pki).verify(foreign)
    case = SynchronousTestCase()
    case.failureResultOf(checker(pki).requestAvatarId(ClientCertificate(foreign)), CertificateRejected)


def test_self_signed_copy_of_the_ca_name_is_refused(pki: dict[str, Any]) -> None:
    """A self-made CA with the same name as the real one does not fool the verifier."""
    fake_key, fake_ca = generate_ca("test client CA")
    forged = issue_certificate(fake_key, fake_ca, "alice", client=True)[1]
    with pytest.raises(CertificateRejected):
        checker(pki).verify(forged)


def test_expired_certificate_is_refused(pki: dict[str, Any]) -> None:
    """A certificate past its notAfter is refused, and so is one not valid yet."""
    past = datetime.datetime.now(UTC) - datetime.timedelta(days=10)
    expired = client(pki, not_before=past, days=1)
    with pytest.raises(CertificateRejected, match="expired"):
        checker(pki).verify(expired)
    future = client(pki, not_before=datetime.datetime.now(UTC) + datetime.timedelta(days=2))
    with pytest.raises(CertificateRejected, match="not yet valid"):
        checker(pki).verify(future)


def test_validity_follows_the_injected_clock(pki: dict[str, Any]) -> None:
    """The verifier checks dates at the clock's time: the same certificate expires as it moves."""
    start = datetime.datetime(2030, 1, 1, tzinfo=UTC)
    ca_key, ca = pki["ca_key"], pki["ca"]
    cert = issue_certificate(ca_key, ca, "alice", client=True, not_before=start, days=1)[1]
    clock = clock_at(start + datetime.timedelta(hours=1))
    mtls = checker(pki, clock=clock)
    assert mtls.verify(cert).id == "alice"
    clock.advance(2 * 86400)
    with pytest.raises(CertificateRejected, match="expired"):
        mtls.verify(cert)


def test_wrong_organization_is_refused(pki: dict[str, Any]) -> None:
    """With allowed_organizations set, a certificate of another (or no) organization is refused."""
    settings = MTLSConfig(allowed_organizations=["Acme"])
    with pytest.raises(CertificateRejected, match="organization"):
        checker(pki, settings).verify(client(pki, organization="Evil Corp"))
    with pytest.raises(CertificateRejected, match="organization"):
        checker(pki, settings).verify(client(pki))
    assert checker(pki, settings).verify(client(pki, organization="Acme")).id == "alice"


def test_server_only_certificate_is_refused(pki: dict[str, Any]) -> None:
    """A certificate whose extended key usage excludes client authentication is refused."""
    server_cert = issue_certificate(pki["ca_key"], pki["ca"], "db.example", client=False)[1]
    with pytest.raises(CertificateRejected, match="client authentication"):
        checker(pki).verify(server_cert)


def test_revoked_certificate_is_refused_with_a_crl(pki: dict[str, Any]) -> None:
    """With a CRL, a revoked certificate is refused and the others pass."""
    revoked, kept = client(pki, "revoked"), client(pki, "kept")
    crls = (revocation_list(pki, revoked),)
    with pytest.raises(CertificateRejected, match="revoked"):
        checker(pki, crls=crls).verify(revoked)
    assert checker(pki, crls=crls).verify(kept).id == "kept"


def test_expired_crl_refuses_rather_than_skipping_the_check(pki: dict[str, Any]) -> None:
    """A CRL past its nextUpdate refuses certificates instead of silently accepting them."""
    crls = (revocation_list(pki, fresh=False),)
    with pytest.raises(CertificateRejected, match="CRL has expired"):
        checker(pki, crls=crls).verify(client(pki))


def test_intermediates_sent_by_the_client_complete_the_chain(pki: dict[str, Any]) -> None:
    """A leaf issued by an intermediate verifies when the client sends the intermediate along."""
    now = datetime.datetime.now(UTC)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(pki["ca"].subject)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(pki["ca_key"], hashes.SHA256())
    )
    # generate_ca's CA has path_length=0, so build a root that allows one intermediate.
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root with intermediates")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    inter = (
        x509.CertificateBuilder()
        .subject_name(inter.subject)
        .issuer_name(root_name)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    leaf = issue_certificate(inter_key, inter, "bob", client=True)[1]  # type: ignore[arg-type]
    mtls = ClientCertChecker(CertificateVerifier([root]), MTLSConfig(), clock_at())
    assert mtls.verify(leaf, (inter,)).id == "bob"
    with pytest.raises(CertificateRejected):
        mtls.verify(leaf)


def test_identity_is_the_cn_else_the_first_subject_alternative_name(pki: dict[str, Any]) -> None:
    """The identity is the CN; without a CN, the first e-mail, DNS name or URI SAN."""
    assert certificate_identity(client(pki, "carol")) == "carol"
    now = datetime.datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    san_only = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")]))
        .issuer_name(pki["ca"].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("svc.example"), x509.RFC822Name("svc@example.com")]),
            critical=False,
        )
        .sign(pki["ca_key"], hashes.SHA256())
    )
    assert certificate_identity(san_only) == "svc@example.com"
    settings = MTLSConfig(role_map={"id:svc@example.com": ["reader"]})
    assert checker(pki, settings).verify(san_only).roles == ("reader",)


def test_unmapped_certificate_gets_no_roles(pki: dict[str, Any]) -> None:
    """A valid certificate matching no role_map entry logs in with no roles (so RBAC denies all)."""
    assert checker(pki, MTLSConfig(role_map={"id:bob": ["admin"]})).verify(client(pki)).roles == ()


def test_peer_certificates_in_any_form_become_credentials(pki: dict[str, Any]) -> None:
    """What a transport reports (pyOpenSSL X509, cryptography, a chain, nothing) becomes credentials."""
    cert = client(pki)
    as_openssl = crypto.X509.from_cryptography(cert)
    assert client_certificate_from_peer(as_openssl) == ClientCertificate(cert)
    assert client_certificate_from_peer(cert) == ClientCertificate(cert)
    assert client_certificate_from_peer([as_openssl, pki["ca"]]) == ClientCertificate(cert, (pki["ca"],))
    assert client_certificate_from_peer(None) is None
    assert client_certificate_from_peer([]) is None
    with pytest.raises(TypeError):
        client_certificate_from_peer("not a certificate")


def test_verifier_files_are_checked(pki: dict[str, Any], tmp_path: Path) -> None:
    """The CA and CRL files load from PEM; missing or wrong content is a configuration error."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pem(pki["ca"]) + pem(pki["other_ca"]))
    crl = tmp_path / "crl.pem"
    crl.write_bytes(revocation_list(pki).public_bytes(serialization.Encoding.PEM))
    verifier = CertificateVerifier.from_files(str(ca), str(crl))
    assert len(verifier.authorities) == 2 and len(verifier.crls) == 1
    with pytest.raises(AuthConfigError, match="no PEM CRL"):
        CertificateVerifier.from_files(str(ca), str(ca))
    with pytest.raises(AuthConfigError, match="no PEM certificate"):
        CertificateVerifier.from_files(str(crl))
    with pytest.raises(AuthConfigError, match="cannot read"):
        CertificateVerifier.from_files(str(tmp_path / "missing.pem"))


# -- the TLS handshake ----------------------------------------------------------------------------


@implementer(IHandshakeListener)
class Recorder(protocol.Protocol):
    """Records whether the TLS handshake completed and how the connection ended."""

    def __init__(self) -> None:
        self.handshook = False
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshook = True

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason


def handshake(server_options: Any, client_options: Any) -> tuple[Any, Recorder, Recorder]:
    """Run a TLS handshake in memory (real OpenSSL, no sockets); return the server TLS protocol."""
    server_app, client_app = Recorder(), Recorder()
    clock = Clock()
    server_factory = TLSMemoryBIOFactory(
        ReloadableServerTLS(server_options),
        False,
        protocol.Factory.forProtocol(lambda: server_app),
        clock=clock,
    )
    client_factory = TLSMemoryBIOFactory(
        client_options, True, protocol.Factory.forProtocol(lambda: client_app), clock=clock
    )
    _, server_tls, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None), clock=clock
    )
    pump.flush()
    return server_tls, server_app, client_app


@pytest.fixture()
def tls_files(pki: dict[str, Any], tmp_path: Path) -> dict[str, Path]:
    generate_server_tls(tmp_path / "server", "localhost")
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes(pem(pki["ca"]))
    files = {"server": tmp_path / "server", "client_ca": client_ca}
    for name, (key, cert) in {
        "good": issue_certificate(pki["ca_key"], pki["ca"], "alice", client=True, organization="Acme"),
        "foreign": issue_certificate(pki["other_key"], pki["other_ca"], "mallory", client=True),
        "expired": issue_certificate(
            pki["ca_key"],
            pki["ca"],
            "old",
            client=True,
            not_before=datetime.datetime.now(UTC) - datetime.timedelta(days=10),
            days=1,
        ),
    }.items():
        (tmp_path / f"{name}.pem").write_bytes(pem(cert))
        (tmp_path / f"{name}.key").write_bytes(key_pem(key))
        files[name] = tmp_path / f"{name}.pem"
    return files


def client_options(files: dict[str, Path], name: str | None) -> Any:
    cert = files[name] if name else None
    return client_tls_options(
        "localhost",
        files["server"] / "ca.pem",
        client_cert=str(cert) if cert else None,
        client_key=str(cert.with_suffix(".key")) if cert else None,
    )


@pytest.mark.parametrize("client_auth", ["required", "optional"])
def test_tls_handshake_accepts_a_ca_signed_client_certificate(
    tls_files: dict[str, Path], pki: dict[str, Any], client_auth: str
) -> None:
    """The server's TLS options verify a good client certificate; the checker accepts what it saw."""
    server = server_tls_options(
        tls_files["server"] / "server.pem",
        tls_files["server"] / "server.key",
        client_ca=tls_files["client_ca"],
        client_auth=client_auth,  # type: ignore[arg-type]
    )
    server_tls, server_app, _ = handshake(server, client_options(tls_files, "good"))
    assert server_app.handshook and server_app.lost is None
    credentials = client_certificate_from_peer(server_tls.getPeerCertificate())
    assert credentials is not None
    assert checker(pki).verify(credentials.certificate).id == "alice"


@pytest.mark.parametrize("client_auth", ["required", "optional"])
@pytest.mark.parametrize("which", ["foreign", "expired"])
def test_tls_handshake_refuses_foreign_and_expired_client_certificates(
    tls_files: dict[str, Path], client_auth: str, which: str
) -> None:
    """OpenSSL refuses, during the handshake, a certificate from another CA or an expired one."""
    server = server_tls_options(
        tls_files["server"] / "server.pem",
        tls_files["server"] / "server.key",
        client_ca=tls_files["client_ca"],
        client_auth=client_auth,  # type: ignore[arg-type]
    )
    _, server_app, client_app = handshake(server, client_options(tls_files, which))
    assert not server_app.handshook
    assert client_app.lost is not None


def test_tls_handshake_requires_a_certificate_when_required(tls_files: dict[str, Path]) -> None:
    """With client_auth = required a client without a certificate cannot connect; optional lets it."""
    required = server_tls_options(
        tls_files["server"] / "server.pem",
        tls_files["server"] / "server.key",
        client_ca=tls_files["client_ca"],
        client_auth="required",
    )
    _, server_app, _ = handshake(required, client_options(tls_files, None))
    assert not server_app.handshook
    optional = server_tls_options(
        tls_files["server"] / "server.pem",
        tls_files["server"] / "server.key",
        client_ca=tls_files["client_ca"],
        client_auth="optional",
    )
    server_tls, server_app, _ = handshake(optional, client_options(tls_files, None))
    assert server_app.handshook and server_tls.getPeerCertificate() is None


def test_tls_handshake_refuses_a_revoked_certificate_with_a_crl(
    tls_files: dict[str, Path], pki: dict[str, Any], tmp_path: Path
) -> None:
    """With tls.crl, OpenSSL refuses a revoked client certificate during the handshake."""
    good = x509.load_pem_x509_certificate(tls_files["good"].read_bytes())
    crl = tmp_path / "crl.pem"
    crl.write_bytes(revocation_list(pki, good).public_bytes(serialization.Encoding.PEM))
    options = {
        "client_ca": tls_files["client_ca"],
        "client_auth": "required",
    }
    with_crl = server_tls_options(
        tls_files["server"] / "server.pem", tls_files["server"] / "server.key", crl=crl, **options
    )
    _, server_app, _ = handshake(with_crl, client_options(tls_files, "good"))
    assert not server_app.handshook
    crl.write_bytes(revocation_list(pki).public_bytes(serialization.Encoding.PEM))
    clean_crl = server_tls_options(
        tls_files["server"] / "server.pem", tls_files["server"] / "server.key", crl=crl, **options
    )
    _, server_app, _ = handshake(clean_crl, client_options(tls_files, "good"))
    assert server_app.handshook
