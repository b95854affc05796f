"""pgproxy: one client connection relayed to a PostgreSQL database over TLS, whatever brought
the client (a loopback listener, or a stream a connector opened through the relay).

The startup phase goes through ``burrow.pg.startup`` message by message (allow-list, SCRAM
channel binding withheld, the backend's cancel key noted); from the first ReadyForQuery on,
``burrow.pg.splice`` joins the two sides with no parsing (Protocols when the client is an
``Endpoint`` or a relay ``Channel``), so the proxy costs about what a plain forwarder does.
How the connection ended is read once at the end from the last bytes each way: a client's
Terminate, or the server's final ErrorResponse and its SQLSTATE.

One ``pg_connection`` event per connection says who (``identity``, ``peer``), what (``user``,
``database``), how much (``bytes_from_client``, ``bytes_from_server``, ``duration``) and how it
ended (``ended``, ``sqlstate``, ``message``).

``reader``/``writer`` may be one ``burrow.pg.endpoint.Endpoint`` (the standalone listener's),
one ``burrow.net.channel.Channel`` (a relay stream), or asyncio streams (same method names).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from typing import Final, Protocol

from burrow.events import EventSink, emit, format_hostport
from burrow.net.channel import Channel
from burrow.pg.codec import (
    TERMINATE,
    CancelRequest,
    ErrorResponse,
    encode_cancel_request,
    format_version,
    parse_error_fields,
)
from burrow.pg.endpoint import Endpoint
from burrow.pg.errors import MalformedMessage, PgError, UpstreamFailed
from burrow.pg.policy import PgPolicy, database_of
from burrow.pg.splice import CHUNK, Ending, Tail, splice_channel, splice_streams, splice_transports
from burrow.pg.startup import Phase, StartupRelay
from burrow.pg.upstream import PgUpstream, open_upstream

__all__ = [
    "CHUNK",
    "STARTUP_TIMEOUT",
    "Reader",
    "Writer",
    "serve_pg",
]

log = logging.getLogger("burrow.pg")

STARTUP_TIMEOUT: Final = 60.0
"""The whole startup phase, as the server's own authentication_timeout (60 s by default)."""
CANCEL_WAIT: Final = 5.0
"""How long the database may take to close a forwarded CancelRequest's connection."""
_TAIL: Final = 64 * 1024
"""How far back from the end of the server's bytes its final ErrorResponse is looked for."""


class Reader(Protocol):
    """What ``serve_pg`` reads from: ``asyncio.StreamReader`` or a ``Channel``."""

    async def read(self, n: int = -1, /) -> bytes: ...


class Writer(Protocol):
    """What ``serve_pg`` writes to: ``asyncio.StreamWriter`` or a ``Channel``."""

    def write(self, data: bytes, /) -> None: ...

    async def drain(self) -> None: ...

    def can_write_eof(self) -> bool: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


async def serve_pg(
    reader: Reader,
    writer: Writer,
    *,
    upstream: PgUpstream,
    policy: PgPolicy,
    peer: tuple[str, int] | None,
    identity: str | None,
    on_event: EventSink | None,
) -> None:
    """Serve one client connection until either side closes; emits one ``pg_connection``
    event. ``peer`` is the visitor's address, ``identity`` who opened the connection (a
    token's subject; None for a local listener). Closes ``writer``; never raises for what a
    client or the database does."""
    await _Connection(reader, writer, upstream, policy, peer, identity, on_event).run()


class _Connection:
    def __init__(
        self,
        reader: Reader,
        writer: Writer,
        upstream: PgUpstream,
        policy: PgPolicy,
        peer: tuple[str, int] | None,
        identity: str | None,
        on_event: EventSink | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.upstream = upstream
        self.relay = StartupRelay(policy)
        self.peer = peer
        self.identity = identity
        self.on_event = on_event
        self.up: Endpoint | None = None
        self.from_client = Tail()
        self.from_server = Tail()
        self.ended = "client_closed"
        self.sqlstate: str | None = None
        self.message: str | None = None
        self.key_handle: tuple[int, int] | None = None

    async def run(self) -> None:
        started = time.monotonic()
        relay = self.relay
        try:
            try:
                async with asyncio.timeout(STARTUP_TIMEOUT):
                    await self._startup()
            except TimeoutError:
                self.ended = "startup_timeout"
            else:
                if relay.phase is Phase.READY:
                    await self._splice()
                elif relay.phase is Phase.CANCEL:
                    assert relay.cancel is not None
                    async with asyncio.timeout(self.upstream.connect_timeout + CANCEL_WAIT):
                        await self._forward_cancel(relay.cancel)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.debug("pg connection from %s dropped: %r", self.peer, exc)
        except Exception:
            log.exception("pg connection from %s failed", self.peer)
            self.ended = "error"
        finally:
            if self.key_handle is not None:
                self.upstream.cancel_keys.discard(self.key_handle)
            await self._close()
            self._emit(time.monotonic() - started)

    # --- startup ---------------------------------------------------------------------------

    async def _startup(self) -> None:
        relay = self.relay
        while True:
            try:
                await self._step()
            except PgError as exc:
                # The relay queued the answer (if the client can read one); send it, end.
                self.ended = exc.reason
                self.sqlstate = exc.sqlstate
                self.message = exc.message
                await self._flush()
                return
            await self._flush()
            if relay.phase is Phase.CLOSED:
                if relay.server_error is not None:
                    self._server_ended(relay.server_error, during_startup=True)
                elif relay.client_terminated:
                    self.ended = "client_terminated"
                return
            if relay.phase in (Phase.READY, Phase.CANCEL):
                return

    async def _step(self) -> None:
        relay = self.relay
        if relay.phase is Phase.DIAL:
            try:
                self.up = await open_upstream(self.upstream)
            except UpstreamFailed as exc:
                relay.fail(exc)
                raise
            relay.upstream_ready()
            return
        if relay.waiting_for == "client":
            try:
                data = await self.reader.read(CHUNK)
            except ConnectionError:
                data = b""
            if not data:
                self.ended = "client_closed"
                relay.phase = Phase.CLOSED
                return
            self.from_client.add(data)
            relay.receive_client(data)
            return
        assert self.up is not None
        reset = False
        try:
            data = await self.up.read(CHUNK)
        except ConnectionError:
            data, reset = b"", True
        if not data:
            gone = UpstreamFailed(
                f"burrow: the database {'reset' if reset else 'closed'} the connection "
                "during startup",
                reason="server_reset" if reset else "server_closed",
            )
            relay.fail(gone)
            raise gone
        self.from_server.add(data)
        relay.receive_server(data)
        key = relay.backend_key
        if key is not None and self.key_handle is None:
            self.key_handle = self.upstream.cancel_keys.add(key.process_id, key.secret_key)

    async def _flush(self) -> None:
        relay = self.relay
        to_server = relay.data_to_server()
        if to_server and self.up is not None:
            self.up.write(to_server)
            await self.up.drain()
        to_client = relay.data_to_client()
        if to_client:
            self.writer.write(to_client)
            await self.writer.drain()

    # --- after ReadyForQuery ---------------------------------------------------------------

    async def _splice(self) -> None:
        assert self.up is not None
        relay = self.relay
        to_server, to_client = relay.client_remainder(), relay.server_remainder()
        ups, downs = self.from_client, self.from_server
        # The counts so far include startup; the tails restart so the end is read cleanly.
        ups.restart()
        downs.restart()
        reader, writer, up = self.reader, self.writer, self.up
        ending: Ending
        if isinstance(reader, Endpoint) and reader is writer:
            ending = await splice_transports(reader, up, to_server, to_client, ups, downs)
        elif isinstance(reader, Channel) and reader is writer:
            ending = await splice_channel(reader, up, to_server, to_client, ups, downs)
        else:
            ending = await splice_streams(reader, writer, up, to_server, to_client, ups, downs)
        self._classify(ending)

    def _classify(self, ending: Ending) -> None:
        """How the spliced connection ended: the server's final FATAL if it sent one, else
        the client's Terminate, else which side went first (and whether it reset)."""
        final = _final_error(self.from_server.bytes())
        if final is not None and final.severity in ("FATAL", "PANIC"):
            self._server_ended(final, during_startup=False)
        elif self.from_client.bytes().endswith(TERMINATE):
            self.ended = "client_terminated"
        elif ending.client_first:
            self.ended = "client_reset" if ending.failed else "client_closed"
        else:
            self.ended = "server_reset" if ending.failed else "server_closed"

    def _server_ended(self, error: ErrorResponse, *, during_startup: bool) -> None:
        self.ended = "server_error" if during_startup else "server_closed"
        self.sqlstate = error.sqlstate or None
        self.message = error.message or None

    # --- cancel ----------------------------------------------------------------------------

    async def _forward_cancel(self, request: CancelRequest) -> None:
        """Send the request to the database on a fresh TLS connection, only if its key was
        issued on a connection through this upstream (PostgreSQL itself sends no reply)."""
        if not self.upstream.cancel_keys.known(request.process_id, request.secret_key):
            self.ended = "cancel_unknown_key"
            return
        try:
            endpoint = await open_upstream(self.upstream)
        except UpstreamFailed as exc:
            self.ended = "cancel_failed"
            self.message = exc.message
            return
        try:
            endpoint.write(encode_cancel_request(request.process_id, request.secret_key))
            await endpoint.drain()
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(CANCEL_WAIT):
                    await endpoint.read(1)
            self.ended = "cancel_forwarded"
        finally:
            endpoint.abort()

    # --- the end ---------------------------------------------------------------------------

    async def _close(self) -> None:
        if self.up is not None:
            self.up.abort()
        writer = self.writer
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)

    def _emit(self, duration: float) -> None:
        relay = self.relay
        startup = relay.startup
        cancel = relay.cancel
        emit(
            self.on_event,
            "pg_connection",
            identity=self.identity,
            peer=format_hostport(*self.peer[:2]) if self.peer else None,
            kind="cancel" if cancel is not None else "session",
            user=startup.user if startup else None,
            database=database_of(startup) if startup else None,
            application_name=startup.parameters.get("application_name") if startup else None,
            upstream=self.upstream.address,
            duration=round(duration, 3),
            bytes_from_client=self.from_client.total,
            bytes_from_server=self.from_server.total,
            ended=self.ended,
            sqlstate=self.sqlstate,
            message=self.message,
            auth=relay.auth_method,
            withheld=list(relay.withheld),
            protocol=format_version(relay.protocol) if relay.protocol else None,
            backend_pid=(
                cancel.process_id
                if cancel is not None
                else relay.backend_key.process_id
                if relay.backend_key
                else None
            ),
        )


_ERROR_HEAD: Final = struct.Struct("!cI")


def _final_error(tail: bytes) -> ErrorResponse | None:
    """The ErrorResponse that ends ``tail`` exactly, if any (a server's FATAL before it
    closes). Searched backwards over at most ``_TAIL`` bytes: cheap, once per connection."""
    if not tail.endswith(b"\x00\x00"):
        return None
    floor = max(0, len(tail) - _TAIL)
    index = len(tail)
    while (index := tail.rfind(b"E", floor, index)) >= 0:
        if len(tail) - index >= 5:
            _, length = _ERROR_HEAD.unpack_from(tail, index)
            if length == len(tail) - index - 1:
                try:
                    return ErrorResponse(parse_error_fields(tail[index + 5 :]))
                except MalformedMessage:
                    return None
    return None
