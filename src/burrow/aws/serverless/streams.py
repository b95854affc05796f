"""A TCP connection carried as a stream of the serverless protocol (issue 12: private
services through the serverless relay): the bytes in base64 chunks, in order (``q``), each
direction with its own credit (the receiver grants ``credit`` as it writes to its socket, so
neither side buffers more than a window), half-close with ``fin``, an abort with ``reset``.

The same class serves both ends: the agent's side (opened by ``open``, it dials the local
service and answers ``accept``) and the connector's (it opens, and waits for ``accept``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from burrow.aws.serverless import protocol

log = logging.getLogger("burrow.serverless")

Send = Callable[[dict[str, Any]], Awaitable[None]]
READ = 64 * 1024


class TcpStream:
    """One TCP connection on a stream. ``send`` puts a message on the relay connection (the
    caller adds ``to``/``mac`` once the peer is known)."""

    def __init__(self, sid: str, send: Send, *, on_done: Callable[[TcpStream], None]) -> None:
        self.sid = sid
        self.send = send
        self.on_done = on_done
        self.peer: str | None = None
        self.mac: str | None = None
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.order = protocol.Reorder()
        self.window = protocol.INITIAL_WINDOW  # what we may still send
        self._window_open = asyncio.Event()
        self._incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queued = 0
        self._seq = 0
        self.reset_reason: str | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.writer: asyncio.StreamWriter | None = None

    # --- from the relay ------------------------------------------------------------------

    def on_message(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if self.peer is None and isinstance(message.get("from"), str):
            self.peer, self.mac = message["from"], message.get("mac")
        if kind == "accept":
            if not self.accepted.done():
                self.accepted.set_result(None)
        elif kind == "credit":
            self.window += message["n"]
            self._window_open.set()
        elif kind == "reset":
            self.abort(f"{message['code']}: {message.get('why') or ''}".strip(": "))
        elif kind in protocol.SEQUENCED:
            try:
                for item in self.order.push(message):
                    data = protocol.payload(item)
                    if data:
                        self._queued += len(data)
                        if self._queued > 2 * protocol.INITIAL_WINDOW:
                            raise protocol.ProtocolError("the peer sent beyond its window")
                        self._incoming.put_nowait(data)
                    if item.get("fin"):
                        self._incoming.put_nowait(None)
            except protocol.ProtocolError as exc:
                asyncio.get_running_loop().create_task(self.reset("error", str(exc)))

    def abort(self, reason: str) -> None:
        self.reset_reason = reason
        if not self.accepted.done():
            self.accepted.set_exception(ConnectionRefusedError(reason))
            self.accepted.exception()
        if self.writer is not None:
            transport = self.writer.transport
            with contextlib.suppress(Exception):
                transport.abort()
        for task in self.tasks:
            task.cancel()

    # --- joining a socket ----------------------------------------------------------------

    def join(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Pump both ways between the socket and the stream until both ends finished."""
        self.writer = writer
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._out(reader)), loop.create_task(self._in(writer))]
        finished = asyncio.gather(*self.tasks, return_exceptions=True)
        finished.add_done_callback(lambda _: self._finish())

    def _finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.on_done(self)

    async def _out(self, reader: asyncio.StreamReader) -> None:
        """The socket's bytes to the peer, within its credit; its EOF as ``fin``."""
        while True:
            while self.window <= 0:
                self._window_open.clear()
                await self._window_open.wait()
            try:
                data = await reader.read(min(READ, protocol.CHUNK, self.window))
            except (ConnectionError, OSError):
                await self.reset("closed", "the socket failed")
                return
            self.window -= len(data)
            await self.send(
                {
                    "t": "data",
                    "s": self.sid,
                    "q": self._seq,
                    "d": protocol.b64(data),
                    "fin": not data,
                }
            )
            self._seq += 1
            if not data:
                return

    async def _in(self, writer: asyncio.StreamWriter) -> None:
        """The peer's bytes to the socket, granting credit as the socket takes them."""
        granted = 0
        while True:
            data = await self._incoming.get()
            if data is None:
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            writer.write(data)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                await self.reset("closed", "the socket failed")
                return
            self._queued -= len(data)
            granted += len(data)
            if granted >= protocol.INITIAL_WINDOW // 4:
                await self.send({"t": "credit", "s": self.sid, "n": granted})
                granted = 0

    async def reset(self, code: str, why: str) -> None:
        with contextlib.suppress(Exception):
            await self.send({"t": "reset", "s": self.sid, "code": code, "why": why[:200]})
        self.abort(why)
