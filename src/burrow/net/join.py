"""Two session streams joined end to end in the relay: a connector's stream to an agent's.

Each half forwards what it receives to the other half's stream, within that stream's credit,
and returns credit to its own sender only once the bytes are handed on, so the relay holds at
most one window per direction. ACCEPT, FIN and RESET (with its code: refused, timeout, ...)
travel through, which is how a SOCKS client learns precisely why a dial failed.
"""

from __future__ import annotations

from collections.abc import Callable

from burrow.net.connection import SessionConnection
from burrow.net.outbox import Outbox


class JoinHalf:
    """The relay's end of one of the two streams."""

    __slots__ = ("conn", "ended", "fin_sent", "on_done", "other", "outbox", "stream_id")

    def __init__(self, conn: SessionConnection, stream_id: int = 0) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.other: JoinHalf | None = None
        #: What the other half received, waiting for credit on this half's stream.
        self.outbox = Outbox(conn, stream_id)
        self.ended = False  # the peer of this half sent FIN
        self.fin_sent = False
        self.on_done: Callable[[], None] | None = None

    def attach(self) -> None:
        self.conn.attach(self.stream_id, self)

    def open(self, info: dict[str, object]) -> None:
        """Open this half's stream (towards an agent) carrying ``info``."""
        self.stream_id = self.outbox.stream_id = self.conn.open_stream(info, self)

    # --- StreamHandler -----------------------------------------------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        other = self.other
        if other is None:
            return
        outbox = other.outbox
        if outbox.size:
            outbox.send(bytes(data))  # a view of the session's read buffer: it is reused
            return
        sent = other.conn.send(other.stream_id, data)
        if sent < len(data):
            outbox.send(bytes(data[sent:]))
        if sent:
            self.conn.consume(self.stream_id, sent)

    def on_window(self) -> None:
        """This half's stream got credit: move what waits for it."""
        self._pump()

    def on_accept(self) -> None:
        if self.other is not None:
            self.other.conn.accept(self.other.stream_id)

    def on_end(self) -> None:
        self.ended = True
        self._forward_fin()

    def on_reset(self, code: str, reason: str) -> None:
        other, self.other = self.other, None
        self.outbox.clear()
        if other is not None:
            other.other = None
            other.outbox.clear()
            other.conn.reset(other.stream_id, code, reason)
            other._done()
        self._done()

    def pause_source(self) -> None:
        pass  # sources here are streams, held back by credit

    def resume_source(self) -> None:
        self._pump()

    # --- moving bytes -------------------------------------------------------------------------

    def _pump(self) -> None:
        """Move bytes waiting for this half's stream; return their credit to the other's."""
        other = self.other
        if other is None or not self.outbox.size:
            return
        moved = self.outbox.pump()
        if moved:
            other.conn.consume(other.stream_id, moved)
        if not self.outbox.size:
            other._forward_fin()

    def _forward_fin(self) -> None:
        other = self.other
        if self.ended and other is not None and not other.outbox.size and not other.fin_sent:
            other.fin_sent = True
            other.conn.send_fin(other.stream_id)
            if self.fin_sent and other.fin_sent:
                self._forget()

    def _forget(self) -> None:
        other = self.other
        self.conn.detach(self.stream_id, self)
        if other is not None:
            other.conn.detach(other.stream_id, other)
            other._done()
        self._done()

    def _done(self) -> None:
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback()

    def close(self, code: str = "cancelled", reason: str = "closing") -> None:
        """Reset both streams (the relay is closing the route)."""
        self.conn.reset(self.stream_id, code, reason)
        self.on_reset(code, reason)


def join(a: JoinHalf, b: JoinHalf) -> None:
    a.other, b.other = b, a
    a.attach()
    b.attach()
