"""The doctor's connection: a byte stream to the target, direct or through a proxy, that can turn
into TLS. Every path (direct TCP, SOCKS5, HTTP CONNECT, a burrow stream) ends as an asyncio
StreamReader/StreamWriter pair, so the probes and ``start_tls`` work the same on all of them.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

READ_SIZE = 256 * 1024


class Link:
    """One connection to the target. ``recv`` returns b"" at EOF and raises
    ``ConnectionResetError`` on a reset; ``TimeoutError`` when nothing came in time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._early = b""
        self.tls: ssl.SSLObject | None = None

    def unread(self, data: bytes) -> None:
        """Bytes that arrived with a proxy's answer or a probe: ``recv`` returns them first."""
        self._early = data + self._early

    async def recv(self, timeout: float) -> bytes:
        if self._early:
            data, self._early = self._early, b""
            return data
        async with asyncio.timeout(timeout):
            return await self.reader.read(READ_SIZE)

    async def send(self, data: bytes, timeout: float) -> None:
        self.writer.write(data)
        async with asyncio.timeout(timeout):
            await self.writer.drain()

    async def start_tls(
        self, context: ssl.SSLContext, server_hostname: str | None, timeout: float
    ) -> None:
        if self._early:
            raise ssl.SSLError("the server sent bytes before the TLS handshake (MITM?)")
        async with asyncio.timeout(timeout):
            await self.writer.start_tls(context, server_hostname=server_hostname)
        obj = self.writer.get_extra_info("ssl_object")
        self.tls = obj if isinstance(obj, ssl.SSLObject) else None

    async def close(self) -> None:
        writer = self.writer
        if not writer.is_closing():
            writer.close()
        try:
            async with asyncio.timeout(1):
                await writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            writer.transport.abort()


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
