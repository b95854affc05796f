"""A session stream as an asyncio reader/writer pair, for code that speaks a protocol on it
(HTTP on the agent, SOCKS replies, tests) rather than splicing it to a socket.

Reading consumes credit only as the application reads, so a slow consumer holds at most one
window; ``drain()`` waits for the peer's credit, so a fast writer never outruns it. The
method names follow ``asyncio.StreamReader``/``StreamWriter`` so the same code can run on a
real socket or on a channel.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from mypy_extensions import mypyc_attr

from burrow.net.bridge import StreamBridge
from burrow.net.connection import SessionConnection
from burrow.net.outbox import Outbox


# Stays a Python class when compiled: ConnectionError (an OSError) has a C layout that
# mypyc's native classes cannot extend.
@mypyc_attr(native_class=False)
class ChannelReset(ConnectionError):
    """The stream was reset; ``code`` is the wire reset code ("refused", "timeout", ...)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}" if reason else code)
        self.code = code
        self.reason = reason


class Channel:
    """Both halves of one stream; register with ``attach()`` or ``open()``."""

    def __init__(self, conn: SessionConnection, stream_id: int = 0) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.info: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._preconsumed = 0
        self._eof = False
        self._reset: ChannelReset | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._accepted: asyncio.Future[None] = loop.create_future()
        self._outbox = Outbox(conn, stream_id)  # written beyond the credit, sent as credit comes
        self._fin_wanted = False
        self._fin_sent = False
        self._source_paused = False
        #: Called when the peer resets the stream (the visitor went away), e.g. to cancel work.
        self.on_peer_reset: Callable[[], object] | None = None
        self.busy = False  # set by users: work is under way for the peer
        #: Called when the peer half-closes (sends FIN).
        self.on_peer_end: Callable[[], object] | None = None

    # --- opening ----------------------------------------------------------------------

    @classmethod
    def open(cls, conn: SessionConnection, info: dict[str, Any]) -> Channel:
        """Open a new stream on ``conn`` carrying ``info`` to the peer."""
        channel = cls(conn)
        channel.info = info
        channel.stream_id = channel._outbox.stream_id = conn.open_stream(info, channel)
        return channel

    def attach(self, stream_id: int) -> None:
        self.stream_id = self._outbox.stream_id = stream_id
        self.conn.attach(stream_id, self)

    def accept(self) -> None:
        """Tell the opener the far side is ready (the stream was accepted)."""
        self.conn.accept(self.stream_id)

    async def wait_accepted(self) -> None:
        """Wait for the peer's ACCEPT; raise ``ChannelReset`` if it reset the stream instead."""
        await asyncio.shield(self._accepted)

    # --- reading ----------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is buffered if ``n`` < 0); b"" at EOF."""
        while not self._chunks:
            if self._reset is not None:
                raise self._reset
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        if n < 0 or n >= self._buffered:
            data = b"".join(self._chunks)
            self._chunks.clear()
        else:
            out = bytearray()
            while len(out) < n:
                chunk = self._chunks.popleft()
                need = n - len(out)
                if len(chunk) > need:
                    out += chunk[:need]
                    self._chunks.appendleft(chunk[need:])
                else:
                    out += chunk
            data = bytes(out)
        self._buffered -= len(data)
        fresh = len(data) - min(len(data), self._preconsumed)
        self._preconsumed -= len(data) - fresh
        if fresh:
            self.conn.consume(self.stream_id, fresh)
        return data

    async def readexactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = await self.read(n - len(out))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(out), n)
            out += chunk
        return bytes(out)

    async def readuntil(self, separator: bytes = b"\n", limit: int = 65536) -> bytes:
        """Bytes up to and including ``separator``; ``LimitOverrunError`` past ``limit``."""
        out = bytearray()
        while True:
            index = out.find(separator)
            if index >= 0:
                end = index + len(separator)
                self.unread(bytes(out[end:]))
                return bytes(out[:end])
            if len(out) > limit:
                raise asyncio.LimitOverrunError("separator not found within the limit", len(out))
            chunk = await self.read(limit + len(separator))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(out), None)
            out += chunk

    async def readline(self) -> bytes:
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front (its credit was already returned; it is not counted)."""
        if data:
            self._chunks.appendleft(data)
            self._buffered += len(data)
            self._preconsumed += len(data)  # its credit went back when it was first read
            self._readable.set()

    def take_buffered(self) -> list[bytes]:
        """Hand over unread data (its credit not yet returned) to a new owner of the stream."""
        chunks = list(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return chunks

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    # --- writing ----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._fin_wanted or self._reset is not None:
            raise ConnectionResetError("write on a closed channel")
        if not data:
            return
        # Later in this turn a head, a body and its end may follow: they leave as one record.
        self.conn.flush_soon()
        self._outbox.send(bytes(data))
        if self._outbox.size:
            self._writable.clear()

    def writelines(self, lines: list[bytes]) -> None:
        self.write(b"".join(lines))

    def _flush_outbox(self) -> None:
        self._outbox.pump()
        if self._outbox.size:
            return
        self._writable.set()
        if self._fin_wanted and not self._fin_sent:
            self._send_fin()

    async def drain(self) -> None:
        while self._outbox.size:
            if self._reset is not None:
                raise self._reset
            await self._writable.wait()
        if self._reset is not None:
            raise self._reset

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close: the peer reads EOF after what was written."""
        self._fin_wanted = True
        if not self._outbox.size:
            self._send_fin()

    def _send_fin(self) -> None:
        if not self._fin_sent and self._reset is None:
            self._fin_sent = True
            self.conn.send_fin(self.stream_id)
            self._maybe_forget()

    def close(self) -> None:
        """Finish writing, then half-close; a channel closed before EOF from the peer stays
        readable until it ends."""
        self.write_eof()

    def reset(self, code: str = "cancelled", reason: str = "") -> None:
        """Abort in both directions, telling the peer why."""
        if self._reset is None:
            self.conn.reset(self.stream_id, code, reason)
            self._on_reset_local(code, reason)

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            src = self.info.get("src")
            return tuple(src) if isinstance(src, list) else default
        return self.info.get(name, default)

    @property
    def write_buffer_size(self) -> int:
        return self._outbox.size

    # --- StreamHandler ------------------------------------------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        self._chunks.append(bytes(data))
        self._buffered += len(data)
        self._readable.set()

    def on_window(self) -> None:
        if self._outbox.size:
            self._flush_outbox()

    def on_accept(self) -> None:
        if not self._accepted.done():
            self._accepted.set_result(None)

    def on_end(self) -> None:
        self._eof = True
        self._readable.set()
        self._maybe_forget()
        if self.on_peer_end is not None:
            self.on_peer_end()

    def on_reset(self, code: str, reason: str) -> None:
        self._on_reset_local(code, reason)
        if self.on_peer_reset is not None:
            self.on_peer_reset()

    def _on_reset_local(self, code: str, reason: str) -> None:
        self._reset = ChannelReset(code, reason)
        self._eof = True
        self._outbox.clear()
        self._readable.set()
        self._writable.set()
        if not self._accepted.done():
            self._accepted.set_exception(self._reset)
            self._accepted.exception()
        self.conn.detach(self.stream_id, self)

    def pause_source(self) -> None:
        self._writable.clear()

    def resume_source(self) -> None:
        if self._outbox.size:
            self._flush_outbox()
        else:
            self._writable.set()

    def _maybe_forget(self) -> None:
        if self._eof and self._fin_sent:
            self.conn.detach(self.stream_id, self)

    # --- hand-over ------------------------------------------------------------------------

    def splice(self, transport: asyncio.BaseTransport, early: bytes = b"") -> StreamBridge:
        """Hand this accepted stream to a ``StreamBridge`` on ``transport``, so the data path
        runs on Protocols once a handshake (SOCKS, a readiness wait) is done; ``early`` is what
        the socket's side sent beyond the handshake."""
        conn = self.conn
        conn.detach(self.stream_id, self)
        bridge = StreamBridge(conn)
        bridge.attach(self.stream_id)
        transport.set_protocol(bridge)
        bridge.connection_made(transport)
        for chunk in self.take_buffered():  # what the far end said first (a server greeting)
            bridge.on_data(chunk)
        if self.at_eof():
            bridge.on_end()
        if early:
            bridge.data_received(early)
        return bridge
