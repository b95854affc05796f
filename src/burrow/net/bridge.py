"""One TCP connection joined to one session stream, both ways, with flow control and half-close.

The asyncssh pattern with a credit window in place of the peer's ``pause_writing``: bytes read
from the socket go out as long as the stream has credit, and reading pauses when it runs out or
when the session's transport backs up; bytes from the stream go into the socket, and credit is
returned only once the socket's own buffer is below its high mark. So a stalled reader holds at
most one window plus one socket buffer, and every other stream keeps moving.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

from mypy_extensions import mypyc_attr

from burrow.net.connection import SessionConnection
from burrow.net.outbox import Outbox

log = logging.getLogger("burrow.bridge")

SOCKET_WRITE_HIGH = 256 * 1024
SOCKET_WRITE_LOW = 64 * 1024
#: Refusals of a stream before any byte flowed: the socket is closed cleanly (nothing can be
#: mistaken for a complete transfer). Any other reset, and any reset once bytes flowed, resets
#: the socket too, so a client never takes a truncated transfer for a whole one.
CLEAN_RESETS = frozenset(
    {"refused", "unreachable", "timeout", "not_allowed", "no_such_tunnel", "limited"}
)
_LINGER_ZERO = struct.pack("ii", 1, 0)


def reset_socket(transport: asyncio.Transport) -> None:
    """Close ``transport`` with a RST (SO_LINGER 0), not a FIN: the peer's ``recv`` raises
    ECONNRESET instead of reading a clean end of the data."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            pass
    transport.abort()


@mypyc_attr(allow_interpreted_subclasses=True)
class StreamBridge(asyncio.Protocol):
    """Protocol for the socket side; ``SessionConnection`` calls the ``on_*`` methods."""

    __slots__ = (
        "_accepted",
        "_closed",
        "_eof_received",
        "_fin_sent",
        "_on_done",
        "_on_refused",
        "_outbox",
        "_pre_connect",
        "_reading_paused",
        "_remote_fin",
        "_session_paused",
        "_socket_paused",
        "_unconsumed",
        "conn",
        "header",
        "stream_id",
        "transport",
    )

    def __init__(
        self,
        conn: SessionConnection,
        stream_id: int = 0,
        *,
        header: bytes = b"",
        on_done: Callable[[StreamBridge], None] | None = None,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.transport: asyncio.Transport | None = None
        self.header = header  # written to the socket first (a PROXY protocol header)
        self._on_done = on_done
        #: Told (code, reason) when the far end resets a stream it never accepted.
        self._on_refused = on_refused
        self._accepted = False
        self._outbox = Outbox(conn, stream_id)  # socket bytes waiting for credit
        self._pre_connect: list[bytes] = []  # stream bytes that came before the socket
        self._unconsumed = 0  # bytes written to a backed-up socket, credit not yet returned
        self._socket_paused = False  # the socket's write buffer is above its high mark
        self._session_paused = conn.write_paused
        self._reading_paused = False
        self._eof_received = False
        self._fin_sent = False
        self._remote_fin = False
        self._closed = False

    @property
    def _pending(self) -> Outbox | None:
        """Socket bytes waiting for credit (None when nothing waits)."""
        return self._outbox or None

    # --- opening ---------------------------------------------------------------------------

    def attach(self, stream_id: int) -> None:
        """Bind to a stream the peer opened and start receiving its events."""
        self.stream_id = self._outbox.stream_id = stream_id
        self.conn.attach(stream_id, self)

    def open(self, info: dict[str, Any]) -> int:
        """Open a new stream for this socket, carrying ``info`` to the peer."""
        self.stream_id = self._outbox.stream_id = self.conn.open_stream(info, self)
        return self.stream_id

    def adopt(self, transport: asyncio.BaseTransport, early: bytes = b"") -> None:
        """Take over an accepted socket from the protocol that answered it first."""
        transport.set_protocol(self)
        self.connection_made(transport)
        if early:
            self.data_received(early)

    # --- socket side -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        tr.set_write_buffer_limits(SOCKET_WRITE_HIGH, SOCKET_WRITE_LOW)
        if self.header:
            tr.write(self.header)
        if self._pre_connect:
            size = sum(len(chunk) for chunk in self._pre_connect)
            tr.writelines(self._pre_connect)
            self._pre_connect = []
            self._return_credit(size)
        if self._remote_fin:
            self._write_eof()
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        outbox = self._outbox
        if not outbox.size and self.conn.send_all(self.stream_id, data):
            return  # the common case: the stream had the credit
        if not data or not self.conn.stream_open(self.stream_id):
            return  # the stream is gone; connection_lost or on_reset tidies up
        outbox.send(memoryview(data))
        if outbox.size:
            self._update_reading()

    def eof_received(self) -> bool:
        self._eof_received = True
        if not self._outbox.size:
            self._send_fin()
        return True  # keep the other direction open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self._closed:
            if not (self._fin_sent and self._remote_fin):
                self.conn.reset(
                    self.stream_id, "error", "connection reset" if exc else "connection closed"
                )
            self._finish()

    def pause_writing(self) -> None:
        self._socket_paused = True

    def resume_writing(self) -> None:
        self._socket_paused = False
        if self._unconsumed:
            size, self._unconsumed = self._unconsumed, 0
            self.conn.consume(self.stream_id, size)

    # --- stream side -----------------------------------------------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is None:
            if not self._closed:
                self._pre_connect.append(bytes(data))
            return
        # ``data`` may be a view of the session's read buffer, reused on the next read, while
        # the transport may keep what it cannot send at once: give it bytes of its own.
        transport.write(bytes(data) if type(data) is memoryview else data)
        self._return_credit(len(data))

    def on_window(self) -> None:
        self._flush_outbox()

    def _flush_outbox(self) -> None:
        if self._outbox.size:
            self._outbox.pump()
            if not self._outbox.size and self._eof_received:
                self._send_fin()
        self._update_reading()

    def on_accept(self) -> None:
        self._accepted = True

    def on_end(self) -> None:
        self._remote_fin = True
        if self.transport is not None:
            self._write_eof()

    def on_reset(self, code: str, reason: str) -> None:
        if not self._accepted and self._on_refused is not None:
            self._on_refused(code, reason)
        complete = self._remote_fin  # the far end's FIN came first: all it sent is here
        refused = code in CLEAN_RESETS and not self._accepted
        self._pre_connect = []
        self._outbox.clear()
        self._remote_fin = True
        self._fin_sent = True
        transport = self.transport
        if transport is not None:
            if complete or refused:
                transport.close()
            else:
                reset_socket(transport)
        self._finish()

    def pause_source(self) -> None:
        self._session_paused = True
        self._update_reading()

    def resume_source(self) -> None:
        self._session_paused = False
        self._flush_outbox()

    # --- helpers ---------------------------------------------------------------------------

    def _return_credit(self, size: int) -> None:
        if self._socket_paused:
            self._unconsumed += size
        else:
            self.conn.consume(self.stream_id, size)

    def _send_fin(self) -> None:
        if not self._fin_sent:
            self._fin_sent = True
            self.conn.send_fin(self.stream_id)
            self._maybe_close()

    def _write_eof(self) -> None:
        transport = self.transport
        assert transport is not None
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except (OSError, RuntimeError):
                pass
        else:
            self._eof_received = True
            self._send_fin()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._fin_sent and self._remote_fin and self.transport is not None:
            self.conn.detach(self.stream_id, self)
            self.transport.close()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._eof_received:
            return
        want_paused = self._outbox.size > 0 or self._session_paused
        if want_paused != self._reading_paused:
            self._reading_paused = want_paused
            try:
                if want_paused:
                    transport.pause_reading()
                else:
                    transport.resume_reading()
            except RuntimeError:
                pass

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            self.conn.detach(self.stream_id, self)
            if self._on_done is not None:
                self._on_done(self)

    def close(self) -> None:
        """Tear down the socket and the stream (used when a role shuts down)."""
        if self.transport is not None:
            self.transport.abort()
        else:
            self.conn.reset(self.stream_id, "cancelled", "closing")
            self._finish()


def visitor_info(transport: asyncio.BaseTransport, **extra: Any) -> dict[str, Any]:
    """The OPEN metadata for a connection accepted from a visitor."""
    peer = transport.get_extra_info("peername")
    local = transport.get_extra_info("sockname")
    info: dict[str, Any] = dict(extra)
    if isinstance(peer, tuple):
        info["src"] = [peer[0], peer[1]]
    if isinstance(local, tuple):
        info["dst"] = [local[0], local[1]]
    return info
