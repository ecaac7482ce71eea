"""Mutual TLS from a startup kit's files, and the peer's identity from its certificate.

`server_ssl_context` / `client_ssl_context` serve the data plane (asyncio sockets),
`grpc_server_credentials` / `grpc_channel_credentials` the control plane. All four
require a certificate from the project CA on both sides. Each first checks our own
files (present, key private, certificate from this CA and in date), so a broken kit
fails at startup with a SecurityError that says what to do, not at the first peer.
The ssl and grpc objects made here go only to `hauler.transport`.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from grpc import aio

from hauler.core.config import TlsFiles
from hauler.core.errors import SecurityError
from hauler.security.ca import Role

_KIT_ADVICE = "use the files of one startup kit from `hauler provision`"
_REISSUE = "re-issue its kit with `hauler provision PROJECT.yml -o DIR --overwrite`"
_FOREIGN = f"it was issued by another CA; {_KIT_ADVICE} for this project, on both sides"
_WRONG_HOST = "its certificate does not name the host dialled; dial the server.host of PROJECT.yml"
_ADVICE = (  # (what OpenSSL, BoringSSL or gRPC say, what to do); the first match wins
    ("certificate has expired", f"its certificate has expired; {_REISSUE}"),
    ("certificate is not yet valid", "its certificate is not valid yet; check both hosts' clocks"),
    ("unable to get local issuer certificate", f"the peer's certificate: {_FOREIGN}"),
    ("self-signed certificate", f"the peer's certificate: {_FOREIGN}"),
    (
        "unsuitable certificate purpose",
        "its certificate is not a server's; start the server from its own kit",
    ),
    ("mismatch, certificate is not valid for", _WRONG_HOST),  # OpenSSL, for a name or an address
    ("Hostname Verification Check failed", _WRONG_HOST),  # gRPC
    ("ALERT_UNKNOWN_CA", f"the peer does not trust our certificate: {_FOREIGN}"),
    ("CERTIFICATE_REQUIRED", "the peer requires our certificate; set tls in our config"),
    ("WRONG_VERSION_NUMBER", "the peer does not speak TLS; set tls in its config"),
)


@dataclass(frozen=True)
class Identity:
    """Who a peer is, as its certificate from the project CA says."""

    name: str
    org: str
    role: Role


@dataclass(frozen=True)
class _Pems:
    ca_cert: bytes
    cert: bytes
    key: bytes


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """A data-plane listener's context: TLS 1.3 and a client certificate from the project CA."""
    return _ssl_context(ssl.PROTOCOL_TLS_SERVER, files)


def client_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """A data-plane dialler's context; it checks the server's certificate names the host dialled
    (pass `server_hostname` to the connect call when dialling by another name)."""
    context = _ssl_context(ssl.PROTOCOL_TLS_CLIENT, files)
    context.check_hostname = True
    return context


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Control-plane server credentials that refuse clients without a project certificate."""
    pems = _read_kit(files)
    return grpc.ssl_server_credentials(
        [(pems.key, pems.cert)], root_certificates=pems.ca_cert, require_client_auth=True
    )


def grpc_channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Control-plane channel credentials: present our certificate, trust only the project CA."""
    pems = _read_kit(files)
    return grpc.ssl_channel_credentials(
        root_certificates=pems.ca_cert, private_key=pems.key, certificate_chain=pems.cert
    )


def identity_from_ssl_object(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> Identity:
    """The peer of a verified TLS connection (`transport.get_extra_info("ssl_object")`)."""
    peer = ssl_object.getpeercert()
    if not peer:
        raise SecurityError(f"the peer sent no certificate; {_KIT_ADVICE}")
    fields = {key: value for rdn in peer.get("subject", ()) for key, value in rdn}
    return _identity(
        fields.get("commonName"),
        fields.get("organizationName"),
        fields.get("organizationalUnitName"),
    )


def identity_from_grpc_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> Identity:
    """The peer of a gRPC call (`context.auth_context()`), from the certificate gRPC verified."""
    pems = auth_context.get("x509_pem_cert")
    if not pems:
        raise SecurityError(f"the peer sent no certificate; {_KIT_ADVICE}")
    subject = x509.load_pem_x509_certificate(pems[0]).subject

    def field(oid: x509.ObjectIdentifier) -> str | None:
        values = subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else None

    return _identity(
        field(NameOID.COMMON_NAME),
        field(NameOID.ORGANIZATION_NAME),
        field(NameOID.ORGANIZATIONAL_UNIT_NAME),
    )


def tls_failure(error: ssl.SSLError, *, peer: str) -> SecurityError:
    """A failed TLS handshake with `peer` as a SecurityError saying why and what to do."""
    return SecurityError(f"TLS with {peer} refused: {_advice(str(error))}")


def grpc_tls_failure(error: aio.AioRpcError, *, peer: str) -> SecurityError | None:
    """The SecurityError behind a failed gRPC call, when its TLS handshake failed; else None.

    gRPC reports a refused certificate as UNAVAILABLE, like a server that is down; this tells
    them apart so a refusal is not retried forever.
    """
    details = error.details() or ""
    if "handshake failed" not in details.lower() and "Verification Check failed" not in details:
        return None
    return SecurityError(f"TLS with {peer} refused: {_advice(details)}")


def _advice(text: str) -> str:
    """What to do about a TLS failure, from its message; the message itself when unknown."""
    for clue, advice in _ADVICE:
        if clue in text:
            return advice
    return f"{text}; {_KIT_ADVICE}"


def _identity(name: str | None, org: str | None, role: str | None) -> Identity:
    """An Identity from subject fields; any missing or unknown one means a foreign certificate."""
    if not (name and org and role in {member.value for member in Role}):
        raise SecurityError(
            f"the peer's certificate (CN={name}, O={org}, OU={role}) was not issued "
            f"by `hauler provision`; {_KIT_ADVICE}"
        )
    return Identity(name, org, Role(role))


def _ssl_context(protocol: int, files: TlsFiles) -> ssl.SSLContext:
    """A context for either side: TLS 1.3 only, peer certificate required and checked against the
    CA."""
    pems = _read_kit(files)
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=pems.ca_cert.decode("ascii"))
    context.load_cert_chain(files.cert, files.key)
    return context


def _read_kit(files: TlsFiles) -> _Pems:
    """Read our kit's three files and check them: key private and ours, certificate from the CA and
    in date."""
    pems = _Pems(
        _read(files.ca_cert, "ca_cert"), _read(files.cert, "cert"), _read(files.key, "key")
    )
    if Path(files.key).stat().st_mode & 0o077:
        raise SecurityError(
            f"{files.key}: others may read this private key; `chmod 600 {files.key}`"
        )
    try:
        ca_cert = x509.load_pem_x509_certificate(pems.ca_cert)
        cert = x509.load_pem_x509_certificate(pems.cert)
        key = serialization.load_pem_private_key(pems.key, password=None)
    except (ValueError, TypeError):
        raise SecurityError(
            f"{files.ca_cert}, {files.cert} or {files.key} is not an unencrypted PEM "
            f"certificate or key; {_KIT_ADVICE}"
        ) from None
    if key.public_key() != cert.public_key():
        raise SecurityError(f"{files.key} is not the key of {files.cert}; {_KIT_ADVICE}")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise SecurityError(
            f"{files.cert} was not issued by the CA in {files.ca_cert}; {_KIT_ADVICE}"
        ) from None
    _check_dates(cert, files.cert)
    return pems


def _check_dates(cert: x509.Certificate, path: Path) -> None:
    """Refuse our own certificate outside its validity: a peer would refuse it anyway, less
    clearly."""
    now = datetime.datetime.now(datetime.UTC)
    if now > cert.not_valid_after_utc:
        raise SecurityError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; {_REISSUE}")
    if now < cert.not_valid_before_utc:
        raise SecurityError(
            f"{path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "check this host's clock"
        )


def _read(path: Path, key: str) -> bytes:
    """A kit file's bytes; a missing or unreadable one says which config key names it."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SecurityError(
            f"tls.{key}: cannot read {path} ({error.strerror}); {_KIT_ADVICE}, "
            "and keep its config's tls paths pointing at it"
        ) from None
