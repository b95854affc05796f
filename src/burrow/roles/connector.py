"""The connector: reaches private services and exits through the relay, without public ports.

It presents them as local listeners (``burrow connect``: one TCP port or Unix socket per
service, one stream per accepted connection), as a SOCKS5 / HTTP CONNECT proxy
(``burrow socks``), or as Python calls (``burrow.connect()``). Listeners outlive sessions:
a connection accepted while the relay is away is refused at once, and the next one goes
through the new session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from burrow.errors import ConfigError, ConnectError
from burrow.events import EventSink, emit, format_hostport
from burrow.net.bridge import StreamBridge, visitor_info
from burrow.net.channel import Channel, ChannelReset
from burrow.net.connection import SessionConnection
from burrow.roles.client import ClientConfig, RelayClient


@dataclass
class ListenSpec:
    """``NAME[=LISTEN]``: LISTEN is ``PORT``, ``HOST:PORT`` or ``unix:PATH``; none: any port."""

    service: str
    listen: str = ""

    @classmethod
    def parse(cls, text: str) -> ListenSpec:
        """``NAME[=LISTEN]``, checked before anything dials: a bad name or an impossible
        port is the user's mistake, told now."""
        name, _, listen = text.partition("=")
        if not name or len(name) > 63 or not all(c.isalnum() or c in "-." for c in name):
            raise ConfigError(
                f"invalid service {text!r}: expected NAME or NAME=LISTEN (e.g. db=127.0.0.1:5432)"
            )
        if listen.startswith("unix:"):
            if len(listen) == 5:
                raise ConfigError(f"invalid service {text!r}: unix: needs a path")
        elif listen.isdigit():
            if not 0 <= int(listen) <= 65535:
                raise ConfigError(
                    f"invalid service {text!r}: port {listen} is out of range (1 to 65535)"
                )
        elif listen:
            from burrow.addresses import parse_hostport

            parse_hostport(listen, 0, listen=True)
        return cls(name.lower(), listen)


@dataclass
class ConnectorConfig(ClientConfig):
    services: list[ListenSpec] = field(default_factory=list)


class Connector(RelayClient):
    """``await start()`` returns with the session up and every listener bound."""

    role_name = "connector"

    def __init__(self, config: ConnectorConfig, *, on_event: EventSink | None = None) -> None:
        super().__init__(config, on_event=on_event)
        self.config = config
        self.listeners: dict[str, str] = {}  # service -> local address
        self._servers: list[asyncio.Server] = []
        self._bridges: set[StreamBridge] = set()
        self.refused = 0  # connections refused at open (scope, unknown service, revoked)

    async def __aenter__(self) -> Connector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def on_session(self, conn: SessionConnection) -> None:
        if self._servers or not self.config.services:
            return
        for spec in self.config.services:
            self.listeners[spec.service] = await self._listen(spec)
            emit(
                self.on_event,
                "tunnel_ready",
                kind="connect",
                name=spec.service,
                local=self.listeners[spec.service],
            )

    async def on_close(self) -> None:
        for server in self._servers:
            server.close()
        for bridge in list(self._bridges):
            bridge.close()

    async def _listen(self, spec: ListenSpec) -> str:
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            return _ConnectorVisitor(self, spec.service)

        listen = spec.listen
        try:
            if listen.startswith("unix:"):
                path = listen[5:]
                _remove_stale_socket(path)
                server = await loop.create_unix_server(factory, path)
                self._servers.append(server)
                return f"unix:{path}"
            from burrow.addresses import parse_hostport

            host, port = ("127.0.0.1", 0)
            if listen:
                host, port = (
                    ("127.0.0.1", int(listen))
                    if listen.isdigit()
                    else parse_hostport(listen, 0, listen=True)
                )
            server = await loop.create_server(factory, host, port, reuse_address=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for {spec.service!r} on {listen or '127.0.0.1:0'}: "
                f"{exc.strerror or exc}"
            ) from None
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        return format_hostport(sockname[0], sockname[1])

    # --- streams ---------------------------------------------------------------------------

    def _refused(self, service: str, code: str, reason: str) -> None:
        """The relay or the agent refused a connection to ``service``: say why (psql alone
        would only see "server closed the connection unexpectedly")."""
        self.refused += 1
        emit(
            self.on_event,
            "connection_refused",
            service=service,
            code=code,
            reason=reason or code,
            count=self.refused,
        )

    async def ready_for_streams(self) -> None:
        """Wait until new streams can be opened; a subclass that knows its session may be
        stale (after a Lambda freeze) holds callers here while it checks."""

    def open_channel(self, service: str, target: str | None = None) -> Channel:
        """A stream to ``service`` (an exit's ``target`` HOST:PORT); wait_accepted() before use."""
        conn = self.conn
        if conn is None or not conn.is_open:
            raise ConnectError(f"no session to relay {self.relay_label} right now")
        info: dict[str, Any] = {"service": service}
        if target is not None:
            info["target"] = target
        return Channel.open(conn, info)

    async def wait_ready(self, service: str, timeout: float = 10.0) -> None:
        """Open a probe stream to ``service`` and wait until its far end accepted."""
        channel = self.open_channel(service)
        try:
            async with asyncio.timeout(timeout):
                await channel.wait_accepted()
        except TimeoutError:
            raise ConnectError(
                f"service {service!r} did not answer within {timeout:.0f} s"
            ) from None
        except ChannelReset as exc:
            raise ConnectError(
                f"service {service!r} is not reachable: {exc.reason or exc.code}"
            ) from None
        finally:
            channel.reset("cancelled", "probe done")

    def bridge_transport(
        self,
        transport: asyncio.BaseTransport,
        service: str,
        target: str | None = None,
        *,
        buffered: bytes = b"",
    ) -> StreamBridge | None:
        """Join an accepted socket to a new stream; None (socket closed) if no session."""
        conn = self.conn
        if conn is None or not conn.is_open:
            transport.close()
            emit(
                self.on_event,
                "warning",
                message=f"no session to {self.relay_label}: refused a connection to {service}",
            )
            return None
        info = visitor_info(transport, service=service)
        if target is not None:
            info["target"] = target
        bridge = StreamBridge(
            conn,
            on_done=self._bridges.discard,
            on_refused=lambda code, reason: self._refused(service, code, reason),
        )
        bridge.open(info)
        self._bridges.add(bridge)
        bridge.adopt(transport, buffered)
        return bridge


class _ConnectorVisitor(asyncio.Protocol):
    """A local client of ``burrow connect``: becomes a bridge at once."""

    def __init__(self, connector: Connector, service: str) -> None:
        self.connector = connector
        self.service = service

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connector.bridge_transport(transport, self.service)


def _remove_stale_socket(path: str) -> None:
    """Remove a Unix socket left by an earlier run (never a directory or a regular file)."""
    import stat

    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
