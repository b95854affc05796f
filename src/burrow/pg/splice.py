"""Raw bytes both ways once a PostgreSQL connection is past its startup: the proxy's hot path.

Three shapes, the fastest the endpoints allow: two transports joined by Protocols (a loopback
client and the database: no coroutine per chunk), a relay stream joined to the database's
transport by ``burrow.net.bridge.StreamBridge`` (an agent's pg service), and, for any other
reader/writer pair, a copy loop. Each counts bytes and keeps just enough of the end of each
direction (``Tail``) to tell afterwards how the connection ended, so nothing is parsed on the
way.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, Final, Protocol

from burrow.net.bridge import StreamBridge
from burrow.net.channel import Channel
from burrow.pg.endpoint import WRITE_HIGH, WRITE_LOW, Endpoint, is_tls

__all__ = ["CHUNK", "Ending", "Tail", "splice_channel", "splice_streams", "splice_transports"]

CHUNK: Final = 256 * 1024
"""Bytes per read in the copy loop."""
CLOSE_WAIT: Final = 5.0
"""After the client hangs up, how long the database may take to close its side."""
_KEEP: Final = 64 * 1024


class Reader(Protocol):
    async def read(self, n: int = -1, /) -> bytes: ...


class Writer(Protocol):
    def write(self, data: bytes, /) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class Tail:
    """One direction's byte count and its last bytes (at most ``keep`` of them, in chunks
    kept by reference, so the hot path copies nothing)."""

    __slots__ = ("keep", "last", "previous", "total")

    def __init__(self, keep: int = _KEEP) -> None:
        self.keep = keep
        self.total = 0
        self.previous = b""
        self.last = b""

    def add(self, data: bytes) -> None:
        self.total += len(data)
        if len(data) >= self.keep:
            self.previous, self.last = b"", data
        else:
            self.previous, self.last = self.last, data

    def restart(self) -> None:
        """Forget the bytes seen so far (the count stays)."""
        self.previous = self.last = b""

    def bytes(self) -> bytes:
        return (self.previous + self.last)[-self.keep :]


@dataclass(frozen=True, slots=True)
class Ending:
    """Which side ended first and whether it reset (an error rather than a clean EOF)."""

    client_first: bool
    failed: bool


# --- two transports ---------------------------------------------------------------------------


class _Half(asyncio.Protocol):
    """Installed on one transport; writes what it reads into the other."""

    __slots__ = ("joint", "other", "tail", "tls", "transport")

    def __init__(self, joint: _Joint, transport: asyncio.Transport, tail: Tail) -> None:
        self.joint = joint
        self.transport = transport
        self.tail = tail
        self.tls = is_tls(transport)
        self.other: _Half | None = None

    def data_received(self, data: bytes) -> None:
        self.tail.add(data)
        assert self.other is not None
        self.other.transport.write(data)

    def eof_received(self) -> bool:
        self.joint.ended(self, failed=False)
        return not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.joint.ended(self, failed=exc is not None)

    def pause_writing(self) -> None:
        # This transport is backed up: stop reading the one that feeds it.
        assert self.other is not None
        with contextlib.suppress(RuntimeError):
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.other is not None
        with contextlib.suppress(RuntimeError):
            self.other.transport.resume_reading()


class _Joint:
    def __init__(self) -> None:
        self.client: _Half | None = None
        self.done: asyncio.Future[Ending] = asyncio.get_running_loop().create_future()

    def ended(self, half: _Half, *, failed: bool) -> None:
        if not self.done.done():
            self.done.set_result(Ending(client_first=half is self.client, failed=failed))


async def splice_transports(
    client: Endpoint,
    upstream: Endpoint,
    to_server: bytes,
    to_client: bytes,
    from_client: Tail,
    from_server: Tail,
) -> Ending:
    """Join two endpoints' transports until one side ends; ``to_server``/``to_client`` are
    bytes already read that go first. Closes both transports."""
    client_transport, client_early, client_eof = client.detach()
    up_transport, up_early, up_eof = upstream.detach()
    joint = _Joint()
    near = _Half(joint, client_transport, from_client)
    far = _Half(joint, up_transport, from_server)
    near.other, far.other = far, near
    joint.client = near
    for transport in (client_transport, up_transport):
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
    client_transport.set_protocol(near)
    up_transport.set_protocol(far)
    if to_server or client_early:
        from_client.add(client_early)
        up_transport.write(to_server + client_early)
    if to_client or up_early:
        from_server.add(up_early)
        client_transport.write(to_client + up_early)
    if client_eof:
        near.eof_received()
    elif up_eof:
        far.eof_received()
    if client_transport.is_closing():
        near.connection_lost(None)
    elif up_transport.is_closing():
        far.connection_lost(None)
    try:
        ending = await joint.done
        if not ending.client_first and not ending.failed and client_transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                client_transport.write_eof()
        return ending
    finally:
        # close() sends what is buffered first (the client's Terminate, the server's last
        # ErrorResponse); TLS cannot half-close, so the database's side simply closes.
        client_transport.close()
        up_transport.close()


# --- a relay stream and a transport -----------------------------------------------------------


class _CountingBridge(StreamBridge):
    """A StreamBridge that counts and keeps the tails, and notes who ended first."""

    __slots__ = ("done", "finished", "from_client", "from_server", "tls")

    def __init__(
        self, channel: Channel, from_client: Tail, from_server: Tail, *, tls: bool
    ) -> None:
        super().__init__(channel.conn, on_done=self._finished)
        self.tls = tls
        self.from_client = from_client
        self.from_server = from_server
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[Ending] = loop.create_future()  # the first side ended
        self.finished: asyncio.Future[None] = loop.create_future()  # both sides are closed

    def _ended(self, *, client_first: bool, failed: bool) -> None:
        if not self.done.done():
            self.done.set_result(Ending(client_first=client_first, failed=failed))

    def _finished(self, _: StreamBridge) -> None:
        self._ended(client_first=True, failed=True)
        if not self.finished.done():
            self.finished.set_result(None)

    def data_received(self, data: bytes) -> None:  # the database -> the stream
        self.from_server.add(data)
        super().data_received(data)

    def eof_received(self) -> bool:
        self._ended(client_first=False, failed=False)
        keep_open = super().eof_received()  # sends FIN to the stream
        return keep_open and not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(client_first=False, failed=exc is not None)
        super().connection_lost(exc)

    def on_data(self, data: bytes | memoryview) -> None:  # the stream -> the database
        # ``data`` may be a view of a reused buffer: the tail keeps a copy of its end only.
        tail = self.from_client
        tail.add(bytes(data[-16:]))
        tail.total += max(0, len(data) - 16)
        super().on_data(data)

    def on_end(self) -> None:
        self._ended(client_first=True, failed=False)
        super().on_end()

    def on_reset(self, code: str, reason: str) -> None:
        self._ended(client_first=True, failed=True)
        super().on_reset(code, reason)


async def splice_channel(
    channel: Channel,
    upstream: Endpoint,
    to_server: bytes,
    to_client: bytes,
    from_client: Tail,
    from_server: Tail,
) -> Ending:
    """Hand a relay stream and the database's transport to a StreamBridge (the agent's own
    data path for plain tunnels) until either ends."""
    transport, up_early, up_eof = upstream.detach()
    bridge = _CountingBridge(channel, from_client, from_server, tls=is_tls(transport))
    channel.conn.detach(channel.stream_id, channel)
    bridge.attach(channel.stream_id)
    transport.set_protocol(bridge)
    bridge.connection_made(transport)
    early = to_server
    for chunk in channel.take_buffered():
        early += chunk
    if early:
        # Unread stream bytes were never credited back; on_data returns their credit.
        bridge.on_data(early)
    if channel.at_eof():
        bridge.on_end()
    if to_client or up_early:
        bridge.data_received(to_client + up_early)
    if up_eof:
        bridge.eof_received()
    try:
        ending = await bridge.done
        # Let the bridge finish its half-closes (the last bytes still reach their side).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT):
                await asyncio.shield(bridge.finished)
        return ending
    finally:
        if not bridge.finished.done():
            bridge.close()


# --- any reader/writer ------------------------------------------------------------------------


async def _pump(src: Reader, dst: Writer, tail: Tail) -> None:
    read, write, drain, add = src.read, dst.write, dst.drain, tail.add
    while data := await read(CHUNK):
        add(data)
        write(data)
        await drain()


async def splice_streams(
    reader: Reader,
    writer: Writer,
    upstream: Endpoint,
    to_server: bytes,
    to_client: bytes,
    from_client: Tail,
    from_server: Tail,
) -> Ending:
    """The copy loop for readers/writers that are neither endpoints nor channels."""
    if to_server:
        upstream.write(to_server)
    if to_client:
        writer.write(to_client)
    up = asyncio.ensure_future(_pump(reader, upstream, from_client))
    down = asyncio.ensure_future(_pump(upstream, writer, from_server))
    try:
        done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        client_first = up in done
        error: Any = (up if client_first else down).exception()
        if client_first and error is None:
            upstream.close()
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(asyncio.shield(down), CLOSE_WAIT)
        return Ending(client_first=client_first, failed=error is not None)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
