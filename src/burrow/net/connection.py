"""A wire session carried over an asyncio transport (TCP, TLS on top), with heartbeats.

The protocol object feeds received bytes to the sans-I/O ``Session``, hands stream events to
the ``StreamHandler`` registered for each stream, and writes what the session queued. It owns
its streams: handlers are registered, sent on, reset and forgotten through its methods, and
what they queue is flushed in one place (at the end of a dispatch, at once otherwise, or at the
end of the loop turn when asked), so no caller has to remember to flush. When the transport's
write buffer backs up it pauses every handler's source, so a fast local socket can never grow
the session's buffer without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from burrow.net import heap
from burrow.wire.errors import HandshakeRejected, ProtocolError
from burrow.wire.session import (
    DEFAULT_WINDOW,
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    HandshakeComplete,
    HandshakeFailed,
    PongReceived,
    Role,
    Session,
    State,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowOpened,
    WindowPool,
)

log = logging.getLogger("burrow.session")

#: Size of the buffer the session's transport reads into once the handshake is done.
READ_BUFFER = 256 * 1024
#: ... and before: a peer that has not proven anything gets no more than this.
HANDSHAKE_READ_BUFFER = 16 * 1024 + 64
#: Write-buffer marks for the session transport: high enough to keep the pipe full.
SESSION_WRITE_HIGH = 1024 * 1024
SESSION_WRITE_LOW = 256 * 1024
#: Write-buffer size at which a peer that provokes replies without reading them is dropped.
FLOOD_LIMIT = 3 * 1024 * 1024
#: A peer silent for this many heartbeat intervals is dead.
DEAD_AFTER_INTERVALS = 3
#: Each stream's first window: what a peer may send before anyone read a byte of it.
STREAM_WINDOW = 256 * 1024
#: How far a busy stream's window grows (a stream waiting for credit gets it doubled).
STREAM_WINDOW_MAX = DEFAULT_WINDOW
#: The windows of one session's streams together, unless a role sets its own budget.
SESSION_BUDGET = 64 * 1024 * 1024


def new_session(
    role: Role, *, budget: int = SESSION_BUDGET, shared: WindowPool | None = None, **options: Any
) -> Session:
    """A wire session with the windows burrow runs with: small at first, grown for streams
    that need it, within ``budget`` for the session (and ``shared``'s total, if given)."""
    return Session(
        role,
        window=STREAM_WINDOW,
        max_window=STREAM_WINDOW_MAX,
        pool=WindowPool(budget, shared),
        **options,
    )


class StreamHandler(Protocol):
    """What a ``SessionConnection`` calls for one stream's events."""

    def on_data(self, data: bytes | memoryview) -> None: ...
    def on_window(self) -> None: ...
    def on_accept(self) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, code: str, reason: str) -> None: ...
    def pause_source(self) -> None: ...
    def resume_source(self) -> None: ...


class _Turn:
    """The sessions whose flush waits for the end of the dispatch in progress (a relay's
    connector and agent sessions are dispatched one inside the other's callbacks)."""

    __slots__ = ("deferred", "depth")

    def __init__(self) -> None:
        self.depth = 0
        self.deferred: list[SessionConnection] = []

    def flush_deferred(self) -> None:
        waiting = self.deferred
        if self.depth or not waiting:
            return
        for conn in waiting:  # no dispatch now: nothing is added while this runs
            if conn._flush_scheduled:
                conn.flush()
        waiting.clear()


_turn = _Turn()


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
        self._handlers: dict[int, StreamHandler] = {}
        self.transport: asyncio.Transport | None = None
        self.peer = peer_label
        self.rtt: float | None = None
        self.write_paused = False
        self.close_reason = ""
        #: The code of the protocol error that ended the session, if one did.
        self.error = ""
        self.bytes_in = 0
        self.bytes_out = 0
        self._read_view = memoryview(bytearray(HANDSHAKE_READ_BUFFER))
        self._dispatching = False
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
        self._turn = _turn  # an attribute, not a global: it is read at every message

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
        self._begin_dispatch()
        try:
            try:
                events = session.receive_data(data, self._on_data)
            except ProtocolError as exc:
                self.close(f"protocol error from {self.peer}: {exc} ({exc.code})", error=exc.code)
                return
            except HandshakeRejected as exc:
                _fail_quietly(self.handshake_done, exc)
                self.close(f"refused by relay: {exc.message}")
                return
            handlers = self._handlers
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
        finally:
            self._end_dispatch()
        transport = self.transport
        # Only a transport that stopped taking writes can be flooded (the mark is far above).
        if (
            self.write_paused
            and transport is not None
            and transport.get_write_buffer_size() > FLOOD_LIMIT
        ):
            # Streams stop at the high mark, so only replies the peer provokes (PONG, RESET)
            # and never reads can pile up this far: a flood, as in HTTP/2's ping/reset floods.
            log.warning("%s does not read what it provokes: closing the session", self.peer)
            self.abort(f"{self.peer} flooded the session without reading the replies")
            return
        if session.state is State.CLOSED and self.transport is not None:
            self.close(self.close_reason or "session ended")

    def _on_data(self, stream_id: int, data: bytes | memoryview) -> None:
        handler = self._handlers.get(stream_id)
        if handler is not None:
            handler.on_data(data)

    def _on_event(self, event: object) -> None:
        if isinstance(event, StreamOpened):
            if self._on_stream is None:
                self.session.reset_stream(
                    event.stream_id, "not_allowed", "this end accepts no streams"
                )
            else:
                self._on_stream(self, event.stream_id, event.info)
        elif isinstance(event, StreamEnded):
            handler = self._handlers.get(event.stream_id)
            if not self.session.is_open(event.stream_id):
                self._handlers.pop(event.stream_id, None)
            if handler is not None:
                handler.on_end()
        elif isinstance(event, StreamReset):
            handler = self._handlers.pop(event.stream_id, None)
            if handler is not None:
                handler.on_reset(event.code, event.reason)
        elif isinstance(event, StreamAccepted):
            handler = self._handlers.get(event.stream_id)
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
            self._read_view = memoryview(bytearray(READ_BUFFER))  # the next read uses it
            self._start_heartbeat()
            if not self.handshake_done.done():
                self.handshake_done.set_result(event)
            if self._on_handshake is not None:
                self._on_handshake(self)
        elif isinstance(event, HandshakeFailed):
            error = self.session.internal_error
            if error is not None:
                log.error("refusing %s after an internal error", self.peer, exc_info=error)
            self.close_reason = f"refused {self.peer}: {event.message}"
            log.warning("refused client %s: %s", self.peer, event.message)
        elif isinstance(event, GoAwayReceived):
            self.close_reason = _goaway_reason(event.code, event.reason)

    def eof_received(self) -> bool:
        return False  # the session ends with its transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "connection closed")
        self.close_reason = reason
        _fail_quietly(self.handshake_done, ConnectionError(reason))
        handlers = list(self._handlers.values())
        self._handlers.clear()
        self.session.drop_streams()
        self._read_view = memoryview(b"")
        for handler in handlers:
            handler.on_reset("error", "session lost")
        if not self.closed.done():
            self.closed.set_result(reason)
        if self._on_closed is not None:
            self._on_closed(self, reason)
        heap.release_soon()

    def pause_writing(self) -> None:
        self.write_paused = True
        for handler in list(self._handlers.values()):
            handler.pause_source()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._begin_dispatch()  # what the handlers send now leaves in one write
        try:
            for handler in list(self._handlers.values()):
                handler.resume_source()
        finally:
            self._end_dispatch()

    def _begin_dispatch(self) -> None:
        """Hold this session's flushes, and those asked for on others, until ``_end_dispatch``."""
        self._dispatching = True
        self._turn.depth += 1

    def _end_dispatch(self) -> None:
        """Write what the dispatch queued here, then what it queued on other sessions once the
        outermost dispatch ends (``_Turn``)."""
        self._dispatching = False
        turn = self._turn
        turn.depth -= 1
        self.flush()
        turn.flush_deferred()

    # --- streams --------------------------------------------------------------------------

    def open_stream(self, info: dict[str, Any], handler: StreamHandler) -> int:
        """Open a stream carrying ``info`` to the peer; ``handler`` gets its events."""
        stream_id = self.session.open_stream(info)
        self._handlers[stream_id] = handler
        self._push()
        return stream_id

    def attach(self, stream_id: int, handler: StreamHandler) -> None:
        """Give the events of a stream the peer opened (or a handed-over one) to ``handler``."""
        self._handlers[stream_id] = handler

    def detach(self, stream_id: int, handler: StreamHandler | None = None) -> None:
        """Stop giving events to the stream's handler (only ``handler``'s, if named)."""
        if handler is None or self._handlers.get(stream_id) is handler:
            self._handlers.pop(stream_id, None)

    def handler(self, stream_id: int) -> StreamHandler | None:
        return self._handlers.get(stream_id)

    def sendable(self, stream_id: int) -> int:
        """Bytes that may go out on ``stream_id`` now: its credit, or 0 while backed up."""
        return 0 if self.write_paused else self.session.credit(stream_id)

    def send_all(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Send all of ``data`` if the stream's credit allows it now; else send nothing and
        say so (the caller keeps it). The common case of a socket's read, in one call."""
        if self.write_paused:
            return False
        session = self.session
        if len(data) > session.credit(stream_id):
            return False
        session.send_data(stream_id, data)
        self._push()
        return True

    def send(self, stream_id: int, data: bytes | memoryview) -> int:
        """Send as much of ``data`` as ``sendable`` allows; how many bytes went."""
        size = min(len(data), self.sendable(stream_id))
        if size:
            self.session.send_data(stream_id, data if size == len(data) else data[:size])
            self._push()
        return size

    def consume(self, stream_id: int, size: int) -> None:
        """Bytes of ``stream_id`` were delivered: give the credit back to the peer."""
        self.session.consume(stream_id, size)
        self._push()

    def accept(self, stream_id: int) -> None:
        """Tell the opener that the far end is connected."""
        self.session.accept_stream(stream_id)
        self._push()

    def send_fin(self, stream_id: int) -> None:
        """Half-close: no more data from this side; the handler stays for the other half."""
        self.session.send_fin(stream_id)
        if not self.session.is_open(stream_id):
            self._handlers.pop(stream_id, None)
        self._push()

    def reset(self, stream_id: int, code: str = "error", reason: str = "") -> None:
        """Abort a stream both ways, telling the peer why; its handler hears no more."""
        self._handlers.pop(stream_id, None)
        self.session.reset_stream(stream_id, code, reason)
        self._push()

    def stream_open(self, stream_id: int) -> bool:
        return self.session.is_open(stream_id)

    def _push(self) -> None:
        """Flush what was queued, unless a flush is already due: at the end of this session's
        dispatch, of the turn, or of another session's dispatch (a relay joining two sessions
        sends what one record brought in one record, not a record per frame)."""
        if self._dispatching or self._flush_scheduled:
            return
        if self._turn.depth:
            self._flush_scheduled = True
            self._turn.deferred.append(self)
            return
        self.flush()

    # --- actions ------------------------------------------------------------------------

    def start_handshake(self) -> None:
        """Client: send the preface and HELLO."""
        self.session.start()
        self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        out = self.session.data_to_send()
        if out and self.transport is not None:
            if len(out) == 1:
                self.bytes_out += len(out[0])
                self.transport.write(out[0])
            else:
                self.bytes_out += sum(map(len, out))
                self.transport.writelines(out)

    def flush_soon(self) -> None:
        """Flush at the end of this turn of the event loop rather than at once, so the many
        small writes a protocol handler makes (an HTTP head, a body, its end) leave as one TLS
        record; what others queue meanwhile goes with them."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        if self._flush_scheduled:  # not flushed meanwhile at the end of a dispatch
            self._flush_scheduled = False
            self.flush()

    def send_control(self, message: dict[str, Any]) -> None:
        if self.session.state is State.OPEN and self.transport is not None:
            self.session.send_control(message)
            self._push()

    def close(self, reason: str = "closed", *, code: str = "shutdown", error: str = "") -> None:
        """Say GOAWAY (if the session is up), flush, and close the transport. ``error`` is the
        protocol error's code when the peer broke the protocol (for metrics)."""
        if not self.close_reason:
            self.close_reason = reason
        if error and not self.error:
            self.error = error
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


def _goaway_reason(code: str, reason: str) -> str:
    """How a peer's GOAWAY reads in a log line: "relay shutting down", not "shutdown relay
    shutting down"."""
    if not reason:
        return f"peer went away ({code})"
    return (
        f"peer went away: {reason}" if code == "shutdown" else f"peer went away: {reason} ({code})"
    )


def _fail_quietly(future: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail ``future`` without asyncio's "exception was never retrieved" if nobody awaits it
    (a session refused before anyone waited on its handshake is an ordinary event)."""
    if not future.done():
        future.set_exception(exc)
        future.exception()  # marks it retrieved; a later await still raises
