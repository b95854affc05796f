"""A TCP or TLS connection as the small reader/writer the startup phase needs, which can then
hand its transport over to a Protocol-level splice (``burrow.pg.splice``): asyncio's own
StreamReader keeps its buffer private, so a stream could not be handed over without losing
bytes that arrived meanwhile."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final, cast

__all__ = ["READ_LIMIT", "WRITE_HIGH", "WRITE_LOW", "Endpoint", "is_tls"]

READ_LIMIT: Final = 256 * 1024
"""Bytes held unread before the transport stops reading (the startup phase reads promptly)."""
WRITE_HIGH: Final = 256 * 1024
WRITE_LOW: Final = 64 * 1024


def is_tls(transport: asyncio.BaseTransport | None) -> bool:
    """TLS transports cannot half-close (and asyncio warns when a protocol asks to)."""
    return transport is not None and transport.get_extra_info("ssl_object") is not None


class Endpoint(asyncio.Protocol):
    """Reader and writer of one transport: ``read``/``write``/``drain``/``write_eof``/
    ``close`` as on asyncio streams; ``detach()`` hands the transport and its unread bytes on."""

    def __init__(self, limit: int = READ_LIMIT) -> None:
        self.transport: asyncio.Transport | None = None
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._detached = False
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = tr = cast(asyncio.Transport, transport)
        tr.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self.limit and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return not is_tls(self.transport)  # keep writing (half-close); TLS cannot

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake_reader()
        self._wake_drain()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # --- reading -----------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (everything buffered if ``n`` < 0); b"" at EOF."""
        while not self._chunks:
            if self._error is not None:
                raise ConnectionResetError(str(self._error) or "connection reset")
            if self._eof:
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if n < 0 or n >= self._size:
            data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
            self._chunks.clear()
        else:
            out = bytearray()
            while len(out) < n:
                chunk = self._chunks.popleft()
                need = n - len(out)
                if len(chunk) > need:
                    self._chunks.appendleft(chunk[need:])
                    chunk = chunk[:need]
                out += chunk
            data = bytes(out)
        self._size -= len(data)
        if self._read_paused and self._size <= self.limit and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- writing -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("write on a closed connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._error is not None:
            raise ConnectionResetError(str(self._error) or "connection reset")
        if self._write_paused and self.transport is not None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
            if self._error is not None:
                raise ConnectionResetError(str(self._error) or "connection reset")

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # After ``detach()`` the transport belongs to someone else: these leave it alone.

    def can_write_eof(self) -> bool:
        return not self._detached and self.transport is not None and self.transport.can_write_eof()

    def write_eof(self) -> None:
        if self.transport is not None and not self._detached:
            self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None and not self._detached:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self._detached:
            self.transport.abort()

    async def wait_closed(self) -> None:
        if not self._detached:
            await asyncio.shield(self._closed)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    # --- handover ----------------------------------------------------------------------

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def detach(self) -> tuple[asyncio.Transport, bytes, bool]:
        """Give up the transport: ``(transport, unread bytes, eof seen)``. The caller sets
        its own protocol on the transport; reading is resumed if this endpoint paused it."""
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("the connection is gone")
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._detached = True
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        return transport, data, self._eof
