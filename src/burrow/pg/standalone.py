"""``burrow pgproxy``: pgproxy without a relay, a listener that runs ``serve_pg`` on each
accepted connection. The client leg is plaintext, so it belongs on loopback (the default)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, Final

from burrow.addresses import is_loopback
from burrow.events import EventSink, emit, format_hostport
from burrow.pg.endpoint import Endpoint
from burrow.pg.policy import PgPolicy
from burrow.pg.proxy import serve_pg
from burrow.pg.upstream import PgUpstream

__all__ = ["DEFAULT_LISTEN_PORT", "MAX_CONNECTIONS", "PgProxyServer"]

log = logging.getLogger("burrow.pg")

DEFAULT_LISTEN_PORT: Final = 6432
MAX_CONNECTIONS: Final = 1000
"""Connections served at once; more are closed at accept (the database has its own cap)."""


class PgProxyServer:
    """Listens, serves each connection with ``serve_pg``, and cancels them all on close."""

    def __init__(
        self,
        upstream: PgUpstream,
        policy: PgPolicy,
        *,
        on_event: EventSink | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.upstream = upstream
        self.policy = policy
        self.on_event = on_event
        self.max_connections = max_connections
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refused = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on (host, port), 0 for any free port; ``OSError`` from binding goes to the
        caller. Emits ``warning`` events first (an unverified upstream, a public listener),
        then ``pgproxy_ready``."""
        for message in self.upstream.warnings():
            emit(self.on_event, "warning", message=message)
        if not is_loopback(host):
            emit(
                self.on_event,
                "warning",
                message=f"listening on {host}: the client side of pgproxy is plaintext, so "
                "anyone who can reach this port reads passwords and data; prefer 127.0.0.1",
            )
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Accepted(self), host, port)
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        emit(
            self.on_event,
            "pgproxy_ready",
            listen=format_hostport(*self.address),
            upstream=self.upstream.address,
            server_name=self.upstream.server_name,
            tls="insecure" if self.upstream.insecure else "verified",
            direct_tls=self.upstream.direct_tls,
            allow_users=sorted(self.policy.allow_users),
            allow_databases=sorted(self.policy.allow_databases),
        )
        return self.address

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5.0)

    async def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.serve_forever()

    def _accepted(self, endpoint: Endpoint) -> None:
        if len(self._tasks) >= self.max_connections:
            self._refused += 1
            if self._refused == 1 or self._refused % 1000 == 0:
                emit(
                    self.on_event,
                    "warning",
                    message=f"pgproxy is at {self.max_connections} connections; "
                    f"closed {self._refused} new ones so far",
                )
            endpoint.abort()
            return
        task = asyncio.get_running_loop().create_task(self._serve(endpoint))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, endpoint: Endpoint) -> None:
        sock = endpoint.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = endpoint.get_extra_info("peername")
        try:
            await serve_pg(
                endpoint,
                endpoint,
                upstream=self.upstream,
                policy=self.policy,
                peer=(str(peer[0]), int(peer[1])) if peer else None,
                identity=None,
                on_event=self.on_event,
            )
        except asyncio.CancelledError:
            pass  # the server is closing
        finally:
            endpoint.abort()


class _Accepted(Endpoint):
    """An accepted client: served by the server that made it."""

    def __init__(self, server: PgProxyServer) -> None:
        super().__init__()
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server._accepted(self)
