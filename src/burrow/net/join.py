"""Two session streams joined end to end in the relay: a connector's stream to an agent's.

Each half forwards what it receives to the other half's stream, within that stream's credit,
and returns credit to its own sender only once the bytes are handed on, so the relay holds at
most one window per direction. ACCEPT, FIN and RESET (with its code: refused, timeout, ...)
travel through, which is how a SOCKS client learns precisely why a dial failed.
"""

from __future__ import annotations

from collections import deque

from burrow.net.connection import SessionConnection


class JoinHalf:
    """The relay's end of one of the two streams."""

    __slots__ = ("conn", "ended", "fin_sent", "other", "pending", "stream_id")

    def __init__(self, conn: SessionConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.other: JoinHalf | None = None
        self.pending: deque[bytes] = deque()  # received here, waiting for credit over there
        self.ended = False  # the peer of this half sent FIN
        self.fin_sent = False

    def attach(self) -> None:
        self.conn.handlers[self.stream_id] = self

    # --- StreamHandler -----------------------------------------------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        other = self.other
        if other is None:
            return
        if type(data) is memoryview:
            data = bytes(data)  # a view of the session's read buffer: it is reused
        if self.pending:
            self.pending.append(bytes(data))
            return
        sent = other.send(data)
        if sent < len(data):
            self.pending.append(bytes(data[sent:]))
        if sent:
            self.conn.session.consume(self.stream_id, sent)
            # no flush here: the session flushes after dispatching what it received

    def on_window(self) -> None:
        """The stream behind this half got credit: move what the other half holds."""
        if self.other is not None:
            self.other.drain_into_other()

    def on_accept(self) -> None:
        if self.other is not None:
            self.other.conn.session.accept_stream(self.other.stream_id)
            self.other.conn.flush()

    def on_end(self) -> None:
        self.ended = True
        self._forward_fin()

    def on_reset(self, code: str, reason: str) -> None:
        other, self.other = self.other, None
        self.pending.clear()
        if other is not None:
            other.other = None
            other.pending.clear()
            other.conn.handlers.pop(other.stream_id, None)
            other.conn.session.reset_stream(other.stream_id, code, reason)
            other.conn.flush()

    def pause_source(self) -> None:
        pass  # sources here are streams, held back by credit

    def resume_source(self) -> None:
        if self.other is not None:
            self.other.drain_into_other()

    # --- moving bytes -------------------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> int:
        """Send on this half's stream as much of ``data`` as its credit allows."""
        conn = self.conn
        if conn.write_paused or not conn.is_open:
            return 0
        credit = conn.session.credit(self.stream_id)
        size = min(credit, len(data))
        if size:
            conn.session.send_data(self.stream_id, data[:size] if size < len(data) else data)
            conn.flush()
        return size

    def drain_into_other(self) -> None:
        """Move bytes held by this half into the other half's stream."""
        other = self.other
        if other is None:
            return
        moved = 0
        while self.pending:
            chunk = self.pending[0]
            sent = other.send(chunk)
            moved += sent
            if sent < len(chunk):
                self.pending[0] = chunk[sent:]
                break
            self.pending.popleft()
        if moved:
            self.conn.session.consume(self.stream_id, moved)
            self.conn.flush()
        if not self.pending:
            self._forward_fin()

    def _forward_fin(self) -> None:
        other = self.other
        if self.ended and not self.pending and other is not None and not other.fin_sent:
            other.fin_sent = True
            other.conn.session.send_fin(other.stream_id)
            other.conn.flush()
            self._maybe_forget()
            other._maybe_forget()

    def _maybe_forget(self) -> None:
        other = self.other
        if other is not None and self.fin_sent and other.fin_sent:
            self.conn.handlers.pop(self.stream_id, None)
            other.conn.handlers.pop(other.stream_id, None)

    def close(self, code: str = "cancelled", reason: str = "closing") -> None:
        """Reset both streams (the relay is closing the route)."""
        self.conn.session.reset_stream(self.stream_id, code, reason)
        self.conn.handlers.pop(self.stream_id, None)
        self.conn.flush()
        self.on_reset(code, reason)


def join(a: JoinHalf, b: JoinHalf) -> None:
    a.other, b.other = b, a
    a.attach()
    b.attach()
