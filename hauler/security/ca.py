"""The project CA and the certificates it issues.

A project has one CA (ECDSA P-256, self-signed). Every participant gets a
certificate from it whose subject carries who it is: CN = name, O = organisation,
OU = role. Mutual TLS with this CA is the whole of authentication: a peer is
exactly what its certificate's subject says, because only the CA could sign it.

Files are written whole (a temporary file renamed into place) and born with
their final mode: private keys 0600, certificates 0644. A key is never readable
by others, not even for the instant between creating and chmod-ing it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALID = datetime.timedelta(days=3650)  # the project's lifetime; participants' certs end with it
CLOCK_SKEW = datetime.timedelta(hours=1)  # backdated so hosts with a slow clock accept new certs
LOCAL_HOSTS = ("localhost", "127.0.0.1")  # a server cert also serves local trials and health checks
KEY_MODE = 0o600
CERT_MODE = 0o644


class Role(StrEnum):
    """What a participant is; written in its certificate's OU."""

    SERVER = "server"
    SITE = "site"
    PROJECT_ADMIN = "project_admin"
    ORG_ADMIN = "org_admin"
    MEMBER = "member"


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def create_authority(project: str) -> Issued:
    """A new self-signed project CA, valid for CA_VALID; it signs every participant's
    certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{project} CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, project),
        ]
    )
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    not_after = datetime.datetime.now(datetime.UTC) + CA_VALID
    builder = (
        _builder(subject, key.public_key(), not_after)
        .issuer_name(subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    )
    return Issued(builder.sign(key, hashes.SHA256()), key)


def issue(
    authority: Issued, name: str, *, org: str, role: Role, hosts: Sequence[str] = ()
) -> Issued:
    """A participant's key and certificate signed by `authority`.

    A server's certificate names `hosts` (plus LOCAL_HOSTS) so clients can check they reached
    the right machine, and may serve and dial (serverAuth + clientAuth); everyone else only dials.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
        ]
    )
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    purposes = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        _builder(subject, key.public_key(), authority.cert.not_valid_after_utc)
        .issuer_name(authority.cert.subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
            critical=False,
        )
    )
    if role is Role.SERVER:
        purposes.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_alt_names(hosts)), critical=False
        )
    builder = builder.add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
    return Issued(builder.sign(authority.key, hashes.SHA256()), key)


def _builder(
    subject: x509.Name, public_key: ec.EllipticCurvePublicKey, not_after: datetime.datetime
) -> x509.CertificateBuilder:
    """What every certificate shares: subject, key, serial, validity and key identifier.

    A participant's certificate ends with its CA's, since no certificate outlives its issuer.
    """
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """subjectAltName entries: an IP address entry for each literal address, DNS for the rest."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOCAL_HOSTS]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def cert_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM, the form every kit file and gRPC take."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key unencrypted (PKCS#8): a kit must start unattended; file mode 0600 protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_issued(issued: Issued, cert_path: Path, key_path: Path) -> None:
    """Write a certificate (0644) and its key (0600)."""
    write_file(cert_path, cert_pem(issued.cert), mode=CERT_MODE)
    write_file(key_path, key_pem(issued.key), mode=KEY_MODE)


def load_issued(cert_path: Path, key_path: Path) -> Issued:
    """Read back a certificate and key written by `write_issued`; ValueError if they do not pair."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ValueError(f"{key_path} is not the key of {cert_path}")
    return Issued(cert, key)


def write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write `path` whole: a temporary file created with `mode`, fsynced, renamed over `path`.

    The mode is set at creation, so a key is never readable by others, and a reader of
    `path` sees the old file or the new one, never a part.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
