"""Mutual TLS on loopback with real certificates: asyncio sockets (data plane) and
grpc.aio (control plane) accept a kit of the project CA and refuse everything else."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from grpc import aio

from hauler.core.config import TlsFiles
from hauler.core.errors import SecurityError
from hauler.security import (
    Identity,
    Role,
    client_ssl_context,
    grpc_channel_credentials,
    grpc_server_credentials,
    grpc_tls_failure,
    identity_from_grpc_auth_context,
    identity_from_ssl_object,
    server_ssl_context,
    tls_failure,
)
from hauler.security.ca import (
    Issued,
    cert_pem,
    create_authority,
    issue,
    write_file,
    write_issued,
)

HOST = "127.0.0.1"
SITE = Identity("site-1", "hospital-a", Role.SITE)


@dataclass(frozen=True)
class Pki:
    """Kits of one project (server, site-1) and of a rogue project's site."""

    server: TlsFiles
    site: TlsFiles
    rogue: TlsFiles
    authority: Issued


def write_kit(folder: Path, authority: Issued, identity: Identity) -> TlsFiles:
    folder.mkdir(parents=True)
    write_file(folder / "ca.pem", cert_pem(authority.cert), mode=0o644)
    issued = issue(
        authority, identity.name, org=identity.org, role=identity.role, hosts=["server.test"]
    )
    write_issued(issued, folder / "cert.pem", folder / "key.pem")
    return TlsFiles(ca_cert=folder / "ca.pem", cert=folder / "cert.pem", key=folder / "key.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    authority, rogue_authority = create_authority("project"), create_authority("rogue")
    return Pki(
        server=write_kit(root / "server", authority, Identity("server", "project", Role.SERVER)),
        site=write_kit(root / "site", authority, SITE),
        rogue=write_kit(
            root / "rogue", rogue_authority, Identity("site-1", "hospital-a", Role.SITE)
        ),
        authority=authority,
    )


def rogue_cert_trusting_project(pki: Pki) -> ssl.SSLContext:
    """A client that trusts the project's CA but presents a certificate of another CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.server.ca_cert)
    context.load_cert_chain(pki.rogue.cert, pki.rogue.key)
    return context


def no_cert_trusting_project(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki.server.ca_cert)


class EchoIdentity:
    """A data-plane server that answers each client with the identity its certificate gives."""

    def __init__(self) -> None:
        self.seen: list[Identity] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        identity = identity_from_ssl_object(writer.get_extra_info("ssl_object"))
        self.seen.append(identity)
        writer.write(f"{identity.name}|{identity.org}|{identity.role}\n".encode())
        await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def echo_server(files: TlsFiles) -> AsyncIterator[tuple[EchoIdentity, int]]:
    """A TLS server on loopback with `files` as its kit: (who it has seen, its port)."""
    echo = EchoIdentity()
    async with await asyncio.start_server(
        echo.handle, HOST, 0, ssl=server_ssl_context(files)
    ) as server:
        yield echo, server.sockets[0].getsockname()[1]


async def ask(
    port: int, context: ssl.SSLContext | None, server_hostname: str | None = None
) -> bytes:
    reader, writer = await asyncio.open_connection(
        HOST, port, ssl=context, server_hostname=server_hostname
    )
    try:
        writer.write(b"who am I?\n")
        return await reader.readline()
    finally:
        writer.close()


async def test_mutual_handshake_gives_each_side_the_other_identity(pki: Pki) -> None:
    async with echo_server(pki.server) as (echo, port):
        reader, writer = await asyncio.open_connection(HOST, port, ssl=client_ssl_context(pki.site))
        assert await reader.readline() == b"site-1|hospital-a|site\n"
        ssl_object = writer.get_extra_info("ssl_object")
        assert identity_from_ssl_object(ssl_object) == Identity("server", "project", Role.SERVER)
        assert ssl_object.version() == "TLSv1.3"
        writer.close()
    assert echo.seen == [SITE]


async def test_dialling_the_server_by_its_project_host_name(pki: Pki) -> None:
    async with echo_server(pki.server) as (_, port):
        assert (
            await ask(port, client_ssl_context(pki.site), "server.test")
            == b"site-1|hospital-a|site\n"
        )
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            await ask(port, client_ssl_context(pki.site), "elsewhere.test")
    assert "does not name the host" in str(tls_failure(caught.value, peer="server"))


@pytest.mark.parametrize(
    "client",
    [rogue_cert_trusting_project, no_cert_trusting_project, lambda pki: None],
    ids=["foreign-ca-cert", "no-cert", "plaintext"],
)
async def test_the_server_refuses_clients_without_a_project_certificate(
    pki: Pki, client: Callable[[Pki], ssl.SSLContext | None]
) -> None:
    async with echo_server(pki.server) as (echo, port):
        try:
            answer = await ask(port, client(pki))
        except (ssl.SSLError, ConnectionError):
            answer = b""  # asyncio's TLS closes a refused peer without an alert: either may come
    assert answer == b""
    assert echo.seen == []


@pytest.mark.parametrize(
    "server_kit, client_kit, advice",
    [
        ("server", "rogue", "issued by another CA"),
        ("site", "site", "not a server's"),
    ],
    ids=["client-of-another-project", "site-posing-as-server"],
)
async def test_the_client_refuses_a_server_without_a_project_server_certificate(
    pki: Pki, server_kit: str, client_kit: str, advice: str
) -> None:
    async with echo_server(getattr(pki, server_kit)) as (echo, port):
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            await ask(port, client_ssl_context(getattr(pki, client_kit)))
    assert advice in str(tls_failure(caught.value, peer="server"))
    assert echo.seen == []


def test_a_broken_kit_fails_at_startup_saying_what_to_do(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match=r"tls.cert: cannot read .*missing.pem"):
        server_ssl_context(pki.site.model_copy(update={"cert": tmp_path / "missing.pem"}))
    with pytest.raises(SecurityError, match="was not issued by the CA in"):
        client_ssl_context(pki.rogue.model_copy(update={"ca_cert": pki.site.ca_cert}))
    with pytest.raises(SecurityError, match="is not the key of"):
        grpc_server_credentials(pki.site.model_copy(update={"key": pki.server.key}))
    open_key = tmp_path / "open.key"
    write_file(open_key, pki.site.key.read_bytes(), mode=0o644)
    os.chmod(open_key, 0o644)  # whatever the umask
    with pytest.raises(SecurityError, match="chmod 600"):
        grpc_channel_credentials(pki.site.model_copy(update={"key": open_key}))


def test_an_expired_certificate_is_refused_before_any_peer_sees_it(
    pki: Pki, tmp_path: Path
) -> None:
    current = x509.load_pem_x509_certificate(pki.site.cert.read_bytes())
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    builder = x509.CertificateBuilder(
        subject_name=current.subject,
        issuer_name=current.issuer,
        public_key=current.public_key(),
        serial_number=current.serial_number,
        not_valid_before=past,
        not_valid_after=past + datetime.timedelta(days=1),
    )
    expired = builder.sign(pki.authority.key, hashes.SHA256())
    write_file(tmp_path / "expired.pem", cert_pem(expired), mode=0o644)
    with pytest.raises(SecurityError, match="expired on 2020-01-02; re-issue its kit"):
        client_ssl_context(pki.site.model_copy(update={"cert": tmp_path / "expired.pem"}))


def test_identity_needs_a_certificate_made_by_provision(pki: Pki) -> None:
    with pytest.raises(SecurityError, match="sent no certificate"):
        identity_from_grpc_auth_context({"transport_security_type": [b"insecure"]})
    ca_pem = pki.site.ca_cert.read_bytes()  # has CN and O, but no role
    with pytest.raises(SecurityError, match="was not issued by `hauler provision`"):
        identity_from_grpc_auth_context({"x509_pem_cert": [ca_pem]})


@contextlib.asynccontextmanager
async def grpc_server(files: TlsFiles) -> AsyncIterator[int]:
    """A grpc.aio server on loopback whose one method answers with the caller's identity: its
    port."""

    async def who(request: bytes, context: aio.ServicerContext) -> bytes:
        identity = identity_from_grpc_auth_context(context.auth_context())
        return f"{identity.name}|{identity.org}|{identity.role}".encode()

    server = aio.server()
    handler = grpc.unary_unary_rpc_method_handler(who)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Who", {"Who": handler})]
    )
    port = server.add_secure_port(f"{HOST}:0", grpc_server_credentials(files))
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def call_who(
    port: int, files: TlsFiles, options: list[tuple[str, str]] | None = None
) -> bytes:
    async with aio.secure_channel(
        f"{HOST}:{port}", grpc_channel_credentials(files), options=options
    ) as channel:
        return await channel.unary_unary("/test.Who/Who")(b"", timeout=10)


async def test_grpc_call_over_mutual_tls_sees_the_caller_identity(pki: Pki) -> None:
    async with grpc_server(pki.server) as port:
        assert await call_who(port, pki.site) == b"site-1|hospital-a|site"


@pytest.mark.parametrize(
    "files, options, advice",
    [
        ("rogue", [], "another CA"),
        (
            "site",
            [("grpc.ssl_target_name_override", "elsewhere.test")],
            "does not name the host dialled",
        ),
    ],
    ids=["foreign-ca", "wrong-host"],
)
async def test_grpc_refusals_are_security_errors(
    pki: Pki, files: str, options: list, advice: str
) -> None:
    async with grpc_server(pki.server) as port:
        with pytest.raises(aio.AioRpcError) as caught:
            await call_who(port, getattr(pki, files), options)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert advice in str(grpc_tls_failure(caught.value, peer="server"))


async def test_a_server_that_is_down_is_no_security_error(pki: Pki) -> None:
    async with grpc_server(pki.server) as port:
        pass
    with pytest.raises(aio.AioRpcError) as caught:
        await call_who(port, pki.site)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert grpc_tls_failure(caught.value, peer="server") is None
