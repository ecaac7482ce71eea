"""The control plane: gRPC carrying small JSON messages, never model bytes.

One service, three methods: `Session` (one long-lived bidirectional stream per
site: registration, heartbeats, tasks, results' metadata), `Call` (unary admin
requests) and `Watch` (a job's events, streamed). Messages are JSON objects so a
schema change never needs generated code; their shapes live in `core/messages.py`.
gRPC's errors are mapped to Hauler's at this edge, both ways.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
from grpc import aio

from hauler.core.config import TlsFiles
from hauler.core.errors import (
    ConfigError,
    ConnectionLost,
    HaulerError,
    JobError,
    RemoteProtocolError,
    SecurityError,
)
from hauler.core.untrusted_json import parse_object
from hauler.security import (
    Identity,
    grpc_channel_credentials,
    grpc_server_credentials,
    grpc_tls_failure,
    identity_from_grpc_auth_context,
)

SERVICE = "hauler.Control"
MAX_MESSAGE_BYTES = 32 << 20  # a job package travels in one message; models never do
PROBE_S = 3.0  # how long a server's port may take to accept before it is called not there
PROBE_RETRY_S = 0.25
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_SERVER_OPTIONS = _OPTIONS + [("grpc.http2.min_ping_interval_without_data_ms", 10_000)]
_STATUS = {
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    JobError: grpc.StatusCode.FAILED_PRECONDITION,
    SecurityError: grpc.StatusCode.PERMISSION_DENIED,
    RemoteProtocolError: grpc.StatusCode.INVALID_ARGUMENT,
}
_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: ConfigError,
    grpc.StatusCode.FAILED_PRECONDITION: JobError,
    grpc.StatusCode.NOT_FOUND: JobError,
    grpc.StatusCode.PERMISSION_DENIED: SecurityError,
    grpc.StatusCode.UNAUTHENTICATED: SecurityError,
}

Message = dict[str, Any]


def _encode(message: Message | bytes) -> bytes:
    """A message to send: JSON already made by its sender, or a dict to make it from."""
    if isinstance(message, bytes):
        return message
    return json.dumps(message, separators=(",", ":")).encode()


def _decode(data: bytes) -> Message:
    return parse_object(data, what="control message")


def map_rpc_error(error: grpc.RpcError, where: str) -> HaulerError:
    """The Hauler error for a failed RPC: refusals keep their type, the rest is a lost link."""
    if (
        isinstance(error, aio.AioRpcError)
        and (refusal := grpc_tls_failure(error, peer=where)) is not None
    ):
        return refusal
    code, details = error.code(), error.details() or ""  # type: ignore[attr-defined]
    kind = _ERRORS.get(code)
    if kind is not None:
        return kind(details)
    return ConnectionLost(f"{where}: {code.name.lower()}: {details}")


class MessageStream(Protocol):
    """One side of a bidirectional control stream."""

    async def send(self, message: Message | bytes) -> None: ...
    async def receive(self) -> Message | None: ...


class _Writes:
    """A stream's writes, one at a time, each run to its end even if the task that asked for it
    is cancelled meanwhile. grpc.aio cancels the whole call when a write is interrupted, so a
    site task aborted while reporting its result used to end the site's session."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def run(self, write: Callable[[], Awaitable[None]]) -> None:
        async def one_at_a_time() -> None:
            async with self._lock:
                await write()

        done = asyncio.ensure_future(one_at_a_time())
        done.add_done_callback(_retrieve)
        await asyncio.shield(done)


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a write's failure as seen: it matters only to a caller still waiting, which gets it."""
    if not task.cancelled():
        task.exception()


class _ServerStream:
    def __init__(self, context: aio.ServicerContext) -> None:
        self._context = context
        self._writes = _Writes()

    async def send(self, message: Message | bytes) -> None:
        await self._writes.run(lambda: self._context.write(message))

    async def receive(self) -> Message | None:
        message = await self._context.read()
        return None if message is aio.EOF else message


Peer = Identity | None  # None: a plaintext connection, whose claims nobody vouches for
SessionHandler = Callable[[MessageStream, Peer], Awaitable[None]]
CallHandler = Callable[[Message, Peer], Awaitable[Message]]
WatchHandler = Callable[[Message, Peer], AsyncIterator[Message]]


class ControlServer:
    """Serves `Session`, `Call` and `Watch`; handlers get the caller's certified identity."""

    def __init__(self, *, session: SessionHandler, call: CallHandler, watch: WatchHandler) -> None:
        self._server = aio.server(options=_SERVER_OPTIONS)
        self._tls = False

        async def session_rpc(request_iterator: Any, context: aio.ServicerContext) -> None:
            await self._guard(context, session(_ServerStream(context), self._identify(context)))

        async def call_rpc(request: Message, context: aio.ServicerContext) -> Message:
            return await self._guard(context, call(request, self._identify(context)))

        async def watch_rpc(
            request: Message, context: aio.ServicerContext
        ) -> AsyncIterator[Message]:
            try:
                async for message in watch(request, self._identify(context)):
                    yield message
            except HaulerError as error:
                await context.abort(_status(error), str(error))

        handlers = {
            "Session": grpc.stream_stream_rpc_method_handler(session_rpc, _decode, _encode),
            "Call": grpc.unary_unary_rpc_method_handler(call_rpc, _decode, _encode),
            "Watch": grpc.unary_stream_rpc_method_handler(watch_rpc, _decode, _encode),
        }
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, handlers)]
        )

    def _identify(self, context: aio.ServicerContext) -> Peer:
        return identity_from_grpc_auth_context(context.auth_context()) if self._tls else None

    async def _guard(self, context: aio.ServicerContext, work: Awaitable[Any]) -> Any:
        try:
            return await work
        except HaulerError as error:
            await context.abort(_status(error), str(error))

    async def start(self, host: str, port: int, tls: TlsFiles | None = None) -> int:
        """Listen on `host:port` (0 picks a port, returned); mutual TLS when `tls` is given."""
        address, self._tls = f"{host}:{port}", tls is not None
        bound = (
            self._server.add_secure_port(address, grpc_server_credentials(tls))
            if tls
            else self._server.add_insecure_port(address)
        )
        if not bound:
            raise HaulerError(f"cannot listen on {address}; pick another control_port")
        await self._server.start()
        return bound

    async def stop(self, grace_s: float = 1.0) -> None:
        await self._server.stop(grace_s)


async def _probe(host: str, port: int, target: str) -> None:
    """Fail within PROBE_S, with what was tried and what to do, if nothing listens at `target`;
    a refused port is tried again until then, as a server that is starting refuses for a moment."""
    deadline = asyncio.get_running_loop().time() + PROBE_S
    while True:
        left = deadline - asyncio.get_running_loop().time()
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), max(left, 0.01))
        except ConnectionRefusedError as error:
            if left > PROBE_RETRY_S:
                await asyncio.sleep(PROBE_RETRY_S)
                continue
            raise _not_there(target, (error.strerror or str(error)).lower()) from None
        except (OSError, TimeoutError) as error:
            reason = (
                "no answer"
                if isinstance(error, TimeoutError)
                else (error.strerror or str(error)).lower()
            )
            raise _not_there(target, reason) from None
        writer.close()
        return


def _not_there(target: str, reason: str) -> ConnectionLost:
    return ConnectionLost(
        f"no server at {target} ({reason}, for {PROBE_S:g} s); start it (`hauler poc "
        "start` for a POC, the server kit's start.sh otherwise), or check server_host and "
        "control_port in the admin's config"
    )


def _status(error: HaulerError) -> grpc.StatusCode:
    for kind, code in _STATUS.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


class _ClientStream:
    def __init__(self, call: Any) -> None:
        self._call = call
        self._writes = _Writes()

    async def send(self, message: Message | bytes) -> None:
        try:
            await self._writes.run(lambda: self._call.write(message))
        except grpc.RpcError as error:
            raise map_rpc_error(error, "control stream") from None
        except aio.UsageError:
            raise ConnectionLost("control stream closed") from None

    async def receive(self) -> Message | None:
        try:
            message = await self._call.read()
        except grpc.RpcError as error:
            raise map_rpc_error(error, "control stream") from None
        return None if message is aio.EOF else message

    def cancel(self) -> None:
        self._call.cancel()


class ControlChannel:
    """A client's channel to the server's control port."""

    def __init__(self, host: str, port: int, tls: TlsFiles | None = None) -> None:
        target = f"{host}:{port}"
        self.target, self._host, self._port = target, host, port
        self._channel = (
            aio.secure_channel(target, grpc_channel_credentials(tls), options=_OPTIONS)
            if tls
            else aio.insecure_channel(target, options=_OPTIONS)
        )

    def session(self) -> _ClientStream:
        method = self._channel.stream_stream(f"/{SERVICE}/Session", _encode, _decode)
        return _ClientStream(method())

    async def call(self, op: str, **body: Any) -> Message:
        method = self._channel.unary_unary(f"/{SERVICE}/Call", _encode, _decode)
        try:
            return await method({"op": op, **body})
        except grpc.RpcError as error:
            raise map_rpc_error(error, f"{op} at {self.target}") from None

    async def watch(self, **body: Any) -> AsyncIterator[Message]:
        method = self._channel.unary_stream(f"/{SERVICE}/Watch", _encode, _decode)
        try:
            async for message in method(body):
                yield message
        except grpc.RpcError as error:
            raise map_rpc_error(error, f"watch at {self.target}") from None

    async def wait_ready(
        self, timeout_s: float, *, on_wait: Callable[[str], None] | None = None
    ) -> None:
        """Wait until the server answers, at most `timeout_s`. A port nobody listens on fails
        within PROBE_S, saying what was tried; a server that accepts but is slow to answer is
        waited for, and `on_wait` is told so."""
        await _probe(self._host, self._port, self.target)
        ready = asyncio.ensure_future(self._channel.channel_ready())
        try:
            done, _ = await asyncio.wait([ready], timeout=min(PROBE_S, timeout_s))
            if not done and on_wait is not None:
                on_wait(
                    f"waiting for the server at {self.target} to answer (up to {timeout_s:g} s) ..."
                )
            await asyncio.wait_for(asyncio.shield(ready), max(0.0, timeout_s - PROBE_S))
        except TimeoutError:
            raise ConnectionLost(
                f"the server at {self.target} accepts connections but did not answer "
                f"within {timeout_s:g} s; it may be overloaded or not a Hauler server"
            ) from None
        finally:
            ready.cancel()

    async def close(self) -> None:
        await self._channel.close()
