"""A wire session carried over an asyncio transport (TCP, TLS on top), with heartbeats.

The protocol object feeds received bytes to the sans-I/O ``Session``, hands stream events to
the ``StreamHandler`` registered for each stream, and writes what the session queued. When the
transport's write buffer backs up it pauses every handler's source, so a fast local socket can
never grow the session's buffer without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from burrow.wire.errors import HandshakeRejected, ProtocolError
from burrow.wire.session import (
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    HandshakeComplete,
    HandshakeFailed,
    PongReceived,
    Session,
    State,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowOpened,
)

log = logging.getLogger("burrow.session")

#: Size of the buffer the session's transport reads into.
READ_BUFFER = 256 * 1024
#: Write-buffer marks for the session transport: high enough to keep the pipe full.
SESSION_WRITE_HIGH = 1024 * 1024
SESSION_WRITE_LOW = 256 * 1024
#: Write-buffer size at which a peer that provokes replies without reading them is dropped.
FLOOD_LIMIT = 3 * 1024 * 1024
#: A peer silent for this many heartbeat intervals is dead.
DEAD_AFTER_INTERVALS = 3


class StreamHandler(Protocol):
    """What a ``SessionConnection`` calls for one stream's events."""

    def on_data(self, data: bytes | memoryview) -> None: ...
    def on_window(self) -> None: ...
    def on_accept(self) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, code: str, reason: str) -> None: ...
    def pause_source(self) -> None: ...
    def resume_source(self) -> None: ...


class SessionConnection(asyncio.BufferedProtocol):
    """One session over one transport; shared by relay, agent and connector.

    A buffered protocol: the transport (and TLS) reads straight into one reused buffer, which
    spares an allocation per read; payloads handed on are views of it, valid during the call.
    """

    def __init__(
        self,
        session: Session,
        *,
        on_stream: Callable[[SessionConnection, int, dict[str, Any]], None] | None = None,
        on_control: Callable[[SessionConnection, dict[str, Any]], None] | None = None,
        on_handshake: Callable[[SessionConnection], None] | None = None,
        on_closed: Callable[[SessionConnection, str], None] | None = None,
        peer_label: str = "",
    ) -> None:
        self.session = session
        self.handlers: dict[int, StreamHandler] = {}
        self.transport: asyncio.Transport | None = None
        self.peer = peer_label
        self.rtt: float | None = None
        self.write_paused = False
        self.close_reason = ""
        self.bytes_in = 0
        self.bytes_out = 0
        self._read_view = memoryview(bytearray(READ_BUFFER))
        self._on_stream = on_stream
        self._on_control = on_control
        self._on_handshake = on_handshake
        self._on_closed = on_closed
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.handshake_done: asyncio.Future[HandshakeComplete] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()
        self._last_rx = loop.time()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._pong_waiters: list[asyncio.Future[None]] = []
        self._flush_scheduled = False

    # --- transport callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        tr.set_write_buffer_limits(SESSION_WRITE_HIGH, SESSION_WRITE_LOW)
        if not self.peer:
            peer = transport.get_extra_info("peername")
            self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "peer"
        self._last_rx = self._loop.time()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self._last_rx = self._loop.time()
        self.bytes_in += len(data)
        session = self.session
        try:
            events = session.receive_data(data)
        except ProtocolError as exc:
            self.close(f"protocol error from {self.peer}: {exc} ({exc.code})")
            return
        except HandshakeRejected as exc:
            _fail_quietly(self.handshake_done, exc)
            self.close(f"refused by relay: {exc.message}")
            return
        handlers = self.handlers
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                handler = handlers.get(event.stream_id)  # type: ignore[union-attr]
                if handler is not None:
                    handler.on_data(event.data)  # type: ignore[union-attr]
            elif kind is WindowOpened:
                handler = handlers.get(event.stream_id)  # type: ignore[union-attr]
                if handler is not None:
                    handler.on_window()
            else:
                self._on_event(event)
        self.flush()
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > FLOOD_LIMIT:
            # Streams stop at the high mark, so only replies the peer provokes (PONG, RESET)
            # and never reads can pile up this far: a flood, as in HTTP/2's ping/reset floods.
            log.warning("%s does not read what it provokes: closing the session", self.peer)
            self.abort(f"{self.peer} flooded the session without reading the replies")
            return
        if session.state is State.CLOSED and self.transport is not None:
            self.close(self.close_reason or "session ended")

    def _on_event(self, event: object) -> None:
        if isinstance(event, StreamOpened):
            if self._on_stream is None:
                self.session.reset_stream(
                    event.stream_id, "not_allowed", "this end accepts no streams"
                )
            else:
                self._on_stream(self, event.stream_id, event.info)
        elif isinstance(event, StreamEnded):
            handler = self.handlers.get(event.stream_id)
            if not self.session.is_open(event.stream_id):
                self.handlers.pop(event.stream_id, None)
            if handler is not None:
                handler.on_end()
        elif isinstance(event, StreamReset):
            handler = self.handlers.pop(event.stream_id, None)
            if handler is not None:
                handler.on_reset(event.code, event.reason)
        elif isinstance(event, StreamAccepted):
            handler = self.handlers.get(event.stream_id)
            if handler is not None:
                handler.on_accept()
        elif isinstance(event, ControlReceived):
            if self._on_control is not None:
                self._on_control(self, event.message)
        elif isinstance(event, PongReceived):
            sent = int.from_bytes(event.payload, "big")
            self.rtt = max(0.0, (time.monotonic_ns() - sent) / 1e9)
            waiters, self._pong_waiters = self._pong_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        elif isinstance(event, HandshakeComplete):
            self._start_heartbeat()
            if not self.handshake_done.done():
                self.handshake_done.set_result(event)
            if self._on_handshake is not None:
                self._on_handshake(self)
        elif isinstance(event, HandshakeFailed):
            self.close_reason = f"refused {self.peer}: {event.message}"
            log.warning("refused client %s: %s", self.peer, event.message)
        elif isinstance(event, GoAwayReceived):
            self.close_reason = f"peer went away: {event.code} {event.reason}".strip()

    def eof_received(self) -> bool:
        return False  # the session ends with its transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "connection closed")
        self.close_reason = reason
        _fail_quietly(self.handshake_done, ConnectionError(reason))
        handlers = list(self.handlers.values())
        self.handlers.clear()
        for handler in handlers:
            handler.on_reset("error", "session lost")
        if not self.closed.done():
            self.closed.set_result(reason)
        if self._on_closed is not None:
            self._on_closed(self, reason)

    def pause_writing(self) -> None:
        self.write_paused = True
        for handler in list(self.handlers.values()):
            handler.pause_source()

    def resume_writing(self) -> None:
        self.write_paused = False
        for handler in list(self.handlers.values()):
            handler.resume_source()

    # --- actions ------------------------------------------------------------------------

    def flush(self) -> None:
        out = self.session.data_to_send()
        if out and self.transport is not None:
            if len(out) == 1:
                self.bytes_out += len(out[0])
                self.transport.write(out[0])
            else:
                self.bytes_out += sum(map(len, out))
                self.transport.writelines(out)

    def flush_soon(self) -> None:
        """Flush at the end of this turn of the event loop, so the many small writes a
        protocol handler makes (an HTTP head, a body, its end) leave as one TLS record."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def send_control(self, message: dict[str, Any]) -> None:
        if self.session.state is State.OPEN and self.transport is not None:
            self.session.send_control(message)
            self.flush()

    def close(self, reason: str = "closed", *, code: str = "shutdown") -> None:
        """Say GOAWAY (if the session is up), flush, and close the transport."""
        if not self.close_reason:
            self.close_reason = reason
        if self.session.state is State.OPEN:
            self.session.go_away(code, reason)
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        if self.transport is not None:
            self.transport.abort()

    async def probe(self, timeout: float) -> bool:
        """Ping the peer and wait for the answer: is the session really alive?"""
        if not self.is_open:
            return False
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._pong_waiters.append(waiter)
        self.session.ping(time.monotonic_ns().to_bytes(8, "big"))
        self.flush()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(waiter)
        except TimeoutError:
            return False
        return self.is_open

    @property
    def is_open(self) -> bool:
        return self.transport is not None and self.session.state is State.OPEN

    # --- heartbeat -------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._heartbeat_task is None:
            self._heartbeat_task = self._loop.create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        interval = self.session.heartbeat
        while self.transport is not None:
            self.session.ping(time.monotonic_ns().to_bytes(8, "big"))
            self.flush()
            await asyncio.sleep(interval)
            silent = self._loop.time() - self._last_rx
            if silent > interval * DEAD_AFTER_INTERVALS:
                log.warning("%s silent for %.1f s: closing the session", self.peer, silent)
                self.abort(f"no heartbeat from {self.peer} for {silent:.0f} s")
                return


def _fail_quietly(future: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail ``future`` without asyncio's "exception was never retrieved" if nobody awaits it
    (a session refused before anyone waited on its handshake is an ordinary event)."""
    if not future.done():
        future.set_exception(exc)
        future.exception()  # marks it retrieved; a later await still raises
