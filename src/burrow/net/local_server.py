"""The small HTTP servers burrow runs for local tools (the relay's admin endpoint, the agent's
inspector): a bounded number of connections, each in a task that is cancelled on close, and
a lingering close so an error response is read before the socket goes away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger("burrow.local")

MAX_CONNECTIONS = 64
LINGER_TIMEOUT = 2.0
LINGER_BYTES = 1024 * 1024


class LocalServer:
    """Subclasses implement ``handle(reader, writer)``; errors a client causes are its own."""

    name = "server"
    max_connections = MAX_CONNECTIONS

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on (host, port), port 0 picking a free one; returns the bound address.
        ``OSError`` from binding goes to the caller, which knows what to tell the user."""
        if self._server is not None:
            raise RuntimeError(f"{self.name} already started")
        self._server = await asyncio.start_server(self._accept, host, port)
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        return self.address

    async def close(self) -> None:
        """Stop listening and end every connection, long-lived ones included."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._tasks) >= self.max_connections:
            writer.transport.abort()
            return
        self._tasks.add(task)
        try:
            await self.handle(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("%s: request failed", self.name)
        finally:
            self._tasks.discard(task)
            # A no-op after a clean close; otherwise (cancelled, timed out) drop the connection.
            writer.transport.abort()


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close and discard what the client is still sending, briefly, so closing with unread
    input does not reset the connection before the client has read our error response."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_TIMEOUT):
            received = 0
            while received < LINGER_BYTES and (chunk := await reader.read(16 * 1024)):
                received += len(chunk)
