"""TLS files: the configured ones, or a private CA and server certificate generated on first start.

With no ``tls.cert`` configured, the first start writes under ``<data_dir>/tls/``:

- ``ca.pem`` / ``ca.key``: a private CA (ECDSA P-256, 10 years) that clients trust;
- ``server.pem`` / ``server.key``: a server certificate signed by it, valid for 127.0.0.1, ::1,
  localhost and this host's name (2 years).

Key files are created with mode 0600.  Later starts reuse them.  The private keys never leave the
data dir; the CA's SHA-256 fingerprint is logged so clients can check what they trust.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from amaters.config import Config


@attrs.frozen
class TLSFiles:
    """Paths of the TLS material a listener serves with."""

    cert: Path
    key: Path
    #: CA that clients should trust for a generated certificate ('' when configured externally).
    ca: Path | None
    ca_fingerprint: str
    generated: bool


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of the first certificate in ``cert_pem``, as colon-separated hex."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_ca(
    common_name: str = "amaters private CA",
    not_before: datetime.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA key and certificate, valid from ``not_before`` (default: 5 minutes ago)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or (now - datetime.timedelta(minutes=5)))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    organization: str | None = None,
    client: bool = False,
    days: int = 730,
    not_before: datetime.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and a leaf certificate signed by the CA (server, or client with ``client=True``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    start = not_before or (datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def generate_server_tls(directory: Path, hostname: str | None = None) -> None:
    """Write ca.pem, ca.key, server.pem and server.key into ``directory`` (created 0700)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    hostname = hostname or socket.gethostname()
    ca_key, ca_cert = generate_ca()
    dns = tuple(dict.fromkeys(["localhost", hostname]))
    key, cert = issue_certificate(ca_key, ca_cert, hostname, dns_names=dns, ip_addresses=("127.0.0.1", "::1"))
    _write_private(directory / "ca.key", _key_pem(ca_key))
    _write_private(directory / "server.key", _key_pem(key))
    (directory / "ca.pem").write_bytes(_pem(ca_cert))
    # The chain: leaf then CA, so clients trusting ca.pem can verify it.
    (directory / "server.pem").write_bytes(_pem(cert) + _pem(ca_cert))


def ensure_server_tls(config: Config) -> TLSFiles:
    """The TLS files to serve with: configured ones, or generated ones (created on first call).

    Does file I/O: call it when the listener starts, not when wiring.
    """
    if config.tls.cert:
        cert = Path(config.tls.cert)
        ca = Path(config.tls.ca) if config.tls.ca else None
        return TLSFiles(
            cert=cert,
            key=Path(config.tls.key),
            ca=ca,
            ca_fingerprint=fingerprint(ca.read_bytes()) if ca else "",
            generated=False,
        )
    directory = config.data_dir / "tls"
    files = [directory / n for n in ("ca.pem", "server.pem", "server.key")]
    generated = False
    if not all(f.exists() for f in files):
        generate_server_tls(directory)
        generated = True
    ca = directory / "ca.pem"
    return TLSFiles(
        cert=directory / "server.pem",
        key=directory / "server.key",
        ca=ca,
        ca_fingerprint=fingerprint(ca.read_bytes()),
        generated=generated,
    )
