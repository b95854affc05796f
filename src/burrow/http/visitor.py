"""One visitor connection as both of the proxy's engines see it: its reader and writer, the
local connection kept across its requests, the host it was opened for, and the inspector's
hooks. Nothing here belongs to one request; each engine keeps its own request state.

``reader``/``writer`` may be asyncio streams or ``burrow.net.channel.Channel`` (same method
names); nothing else about them is assumed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol
from urllib.parse import urlsplit

from burrow.http import limits
from burrow.http.policy import HttpOptions, same_host
from burrow.http.record import Exchange, Recorder
from burrow.http.upstream import Upstream, dial

log = logging.getLogger("burrow.http")


class Reader(Protocol):
    """What ``serve_http`` reads from: ``asyncio.StreamReader`` or a ``Channel``."""

    async def read(self, n: int = -1, /) -> bytes: ...


class Writer(Protocol):
    """What ``serve_http`` writes to: ``asyncio.StreamWriter`` or a ``Channel``."""

    def write(self, data: bytes, /) -> None: ...

    def writelines(self, data: list[bytes], /) -> None: ...

    async def drain(self) -> None: ...

    def can_write_eof(self) -> bool: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class ClientGone(Exception):
    """The visitor closed, reset or went silent: nobody is left to answer."""


class Visitor:
    """What lives as long as one visitor connection, shared by the fast path and h11 engine."""

    def __init__(
        self,
        reader: Reader,
        writer: Writer,
        options: HttpOptions,
        peer: tuple[str, int],
        scheme: str,
        recorder: Recorder | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.options = options
        self.peer_ip = str(peer[0]) if peer else ""
        self.client_label = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        self.scheme = scheme
        self.recorder = recorder
        #: Whether anyone reads the exchanges' headers as text (``Recorder.shows_headers``).
        self.shows_headers = recorder is not None and recorder.shows_headers
        self.public_netloc = urlsplit(options.public_url).netloc if options.public_url else ""
        #: Whether a request may be refused by IP rules or Basic auth.
        self.policed = bool(options.allow or options.deny or options.basic_auth)
        #: The local connection kept for the next request (None until the first one).
        self.upstream: Upstream | None = None
        #: The Host of the connection's first request: the relay routed the whole connection
        #: by it, so later requests must name the same host (``misdirected``).
        self.first_host: bytes | None = None

    # --- reading and writing ----------------------------------------------------------------------

    async def recv(self) -> bytes:
        try:
            return await self.reader.read(limits.CHUNK)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            raise ClientGone(str(exc)) from None

    def write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise ClientGone(str(exc)) from None

    def writelines(self, data: list[bytes]) -> None:
        try:
            self.writer.writelines(data)
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise ClientGone(str(exc)) from None

    async def drain(self) -> None:
        """Wait until the visitor takes what was written (bounded: a visitor that stops
        reading for ``BODY_TIMEOUT`` is given up on)."""
        try:
            async with asyncio.timeout(limits.BODY_TIMEOUT):
                await self.writer.drain()
        except TimeoutError:  # before OSError, of which it is a subclass
            raise ClientGone("the visitor stopped reading") from None
        except (ConnectionError, OSError) as exc:
            raise ClientGone(str(exc)) from None

    # --- the host it serves -----------------------------------------------------------------------

    def misdirected(self, host: bytes) -> bool:
        """Whether a request for ``host`` must be refused with 421: it is not the first
        request's host. The first request's host is remembered here."""
        first = self.first_host
        if first is None:
            self.first_host = host
            return False
        return not same_host(first, host)

    # --- the local service ------------------------------------------------------------------------

    async def kept_upstream(self) -> Upstream:
        """The kept local connection if it can carry another request, else a new one."""
        upstream = self.upstream
        if upstream is not None:
            await asyncio.sleep(0)  # let a pending EOF from the local side land first
            if upstream.usable():
                return upstream
            self.drop_upstream()
        self.upstream = await dial(self.options)
        return self.upstream

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    # --- the inspector ----------------------------------------------------------------------------

    def notify_begin(self, exchange: Exchange) -> None:
        if self.recorder is not None:
            try:
                self.recorder.begin(exchange)
            except Exception:
                log.exception("the request recorder failed")  # the inspector must not cost traffic

    def notify_end(self, exchange: Exchange) -> None:
        if self.recorder is not None:
            try:
                self.recorder.end(exchange)
            except Exception:
                log.exception("the request recorder failed")

    # --- the end ----------------------------------------------------------------------------------

    async def close(self, linger: bool) -> None:
        """Close the visitor's side; with ``linger`` (it may still be sending), half-close
        first and drain a little, so it reads our last answer rather than a reset."""
        try:
            if linger and self.writer.can_write_eof():
                self.writer.write_eof()
                async with asyncio.timeout(limits.LINGER):
                    drained = 0
                    while drained < limits.DISCARD_LIMIT and (
                        data := await self.reader.read(limits.CHUNK)
                    ):
                        drained += len(data)
        except (ConnectionError, OSError, TimeoutError, RuntimeError, asyncio.IncompleteReadError):
            pass
        try:
            self.writer.close()
            async with asyncio.timeout(limits.LINGER):
                await self.writer.wait_closed()
        except (ConnectionError, OSError, TimeoutError, RuntimeError):
            pass
