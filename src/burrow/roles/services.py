"""Service kinds: what an agent offers, as small objects the faces put in its list.

A service says which face of the relay it takes (``kind``: a public ``tcp`` port, a public
``http`` name, a ``private`` name only connectors reach, an ``exit``), under which key its
lease is held, and how it serves each stream that arrives for it (``serve``). The agent only
registers them and hands streams over, so a new kind (``pg``, say) is a module in its own layer
that the faces list; nothing in ``roles/`` changes. The plain TCP kinds and the exit live here.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from burrow.allowlist import AllowList
from burrow.events import EventSink, emit, format_hostport
from burrow.net.bridge import StreamBridge
from burrow.net.channel import Channel
from burrow.net.connection import SessionConnection
from burrow.wire import proxyproto
from burrow.wire.messages import OpenInfo

LOCAL_DIAL_TIMEOUT = 10.0


class Service(Protocol):
    """One thing an agent offers on a relay."""

    @property
    def kind(self) -> str:
        """The relay face it takes: "tcp" (a public port), "http", "private" or "exit"."""
        ...

    @property
    def name(self) -> str | None:
        """The name asked for (None: any, or the one the relay gave last time)."""
        ...

    @property
    def key(self) -> str:
        """The agent's own name for this service: its lease (and remembered port) follows it."""
        ...

    def describe(self) -> dict[str, Any]:
        """Fields for the ``tunnel_ready`` event beyond name and kind (``local``, ...)."""
        ...

    def registered(self, tunnel: ActiveTunnel) -> None:
        """The relay gave ``tunnel.name``/``tunnel.public``: note what the service needs."""
        ...

    def serve(self, stream: IncomingStream) -> None:
        """Serve one stream the relay opened for this service (return quickly; spawn work)."""
        ...


@dataclass(eq=False)
class ActiveTunnel:
    """A service as registered on the current session, and its counters."""

    spec: Service
    port: int | None = None
    name: str | None = None
    public: str | None = None  # what visitors use: HOST:PORT, a URL, or the service name
    connections: int = 0
    open_connections: int = 0


class ServiceHost(Protocol):
    """What a service may ask of the agent running it."""

    on_event: EventSink | None

    def spawn(
        self, coro: Coroutine[Any, Any, Any], owner: ActiveTunnel | None = None
    ) -> asyncio.Task[Any]: ...
    def track(
        self, item: Any, closer: Callable[[], None], owner: ActiveTunnel | None = None
    ) -> None: ...
    def untrack(self, item: Any) -> None: ...


@dataclass(eq=False)
class IncomingStream:
    """A stream the relay opened for a service: where it is, what its OPEN said, and helpers
    that keep the agent's accounting (open connections, cleanup at shutdown) right."""

    conn: SessionConnection
    stream_id: int
    info: dict[str, Any]  # the OPEN's metadata as sent
    tunnel: ActiveTunnel
    host: ServiceHost
    opened: OpenInfo  # ... and checked

    @property
    def src(self) -> tuple[str, int]:
        """The visitor's address as the relay saw it (("", 0) if not given)."""
        return self.opened.src or ("", 0)

    @property
    def dst(self) -> tuple[str, int]:
        return self.opened.dst or ("", 0)

    def bridge(self, header: bytes = b"") -> StreamBridge:
        """A socket bridge bound to this stream (connect it with ``dial``)."""
        bridge = StreamBridge(self.conn, header=header, on_done=self._bridge_done)
        bridge.attach(self.stream_id)
        self.host.track(bridge, bridge.close, self.tunnel)
        return bridge

    def _bridge_done(self, bridge: StreamBridge) -> None:
        self.host.untrack(bridge)
        self.tunnel.open_connections -= 1

    def channel(self, closer: Callable[[Channel], None] | None = None) -> Channel:
        """This stream as a reader/writer, accepted; call ``done()`` when finished with it.
        ``closer`` ends it if the agent shuts down first (default: a reset)."""
        channel = Channel(self.conn)
        channel.info = self.info
        channel.attach(self.stream_id)  # now: DATA for it may follow in the same read
        channel.accept()
        end = closer or (lambda c: c.reset("cancelled", "agent shutting down"))
        self.host.track(channel, lambda: end(channel), self.tunnel)
        return channel

    def done(self, channel: Channel) -> None:
        self.host.untrack(channel)
        self.tunnel.open_connections -= 1

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self.host.spawn(coro, self.tunnel)

    def warn(self, message: str) -> None:
        emit(self.host.on_event, "warning", message=message, tunnel=self.tunnel.spec.key)

    def refuse(self, bridge: StreamBridge, code: str, why: str) -> None:
        """End the stream with ``code``: the connector learns why (a SOCKS reply code)."""
        bridge.on_reset(code, why)
        self.conn.reset(self.stream_id, code, why)

    async def dial(self, bridge: StreamBridge, local: tuple[str, int]) -> bool:
        """Connect ``bridge`` to ``local``; on failure reset the stream with the reason."""
        host, port = local
        where = f"local service {format_hostport(host, port)}"
        loop = asyncio.get_running_loop()
        code, why = "refused", ""
        try:
            async with asyncio.timeout(LOCAL_DIAL_TIMEOUT):
                await loop.create_connection(lambda: bridge, host, port)
        except ConnectionRefusedError:
            why = f"{where} refused the connection"
        except TimeoutError:
            code, why = "timeout", f"{where} did not answer within {LOCAL_DIAL_TIMEOUT:.0f} s"
        except socket.gaierror:
            code, why = "unreachable", f"{where}: the name does not resolve"
        except OSError as exc:
            code = "unreachable"
            why = f"cannot reach {where}: {exc.strerror or exc}"
        else:
            self.conn.accept(self.stream_id)
            return True
        self.warn(why)
        self.refuse(bridge, code, why)
        return False


@dataclass
class TcpTunnelSpec:
    """A local TCP service, public on a relay port or (``private``) reachable by name only."""

    local: tuple[str, int]
    port: int | None = None  # the public port asked for; None: any (or the previous one)
    name: str | None = None
    proxy_protocol: str | None = None  # "v1" or "v2"
    private: bool = False

    @property
    def kind(self) -> str:
        return "private" if self.private else "tcp"

    @property
    def key(self) -> str:
        return self.name or f"tcp:{format_hostport(*self.local)}"

    def describe(self) -> dict[str, Any]:
        return {"local": format_hostport(*self.local)}

    def registered(self, tunnel: ActiveTunnel) -> None:
        pass

    def serve(self, stream: IncomingStream) -> None:
        header = b""
        if self.proxy_protocol:
            header = proxyproto.encode(
                self.proxy_protocol,  # type: ignore[arg-type]
                stream.src,
                stream.dst,
            )
        bridge = stream.bridge(header)
        stream.spawn(stream.dial(bridge, self.local))


@dataclass
class ExitSpec:
    """Dial allow-listed addresses on connectors' behalf, like a bastion with no sudo."""

    name: str
    allow: AllowList
    kind = "exit"

    @property
    def key(self) -> str:
        return f"exit:{self.name}"

    def describe(self) -> dict[str, Any]:
        return {"allow": str(self.allow)}

    def registered(self, tunnel: ActiveTunnel) -> None:
        pass

    def serve(self, stream: IncomingStream) -> None:
        bridge = stream.bridge()
        stream.spawn(self._dial(stream, bridge, stream.opened.target))

    async def _dial(self, stream: IncomingStream, bridge: StreamBridge, target: Any) -> None:
        """Resolve here (private DNS names work), check every address, dial the first allowed."""
        host, port = parse_target(target)
        if host is None:
            stream.refuse(bridge, "not_allowed", f"bad exit target {str(target)[:80]!r}")
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(LOCAL_DIAL_TIMEOUT):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, TimeoutError):
            stream.refuse(bridge, "unreachable", f"{host} does not resolve at exit {self.name}")
            return
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        allowed = [a for a in addresses if self.allow.check(a, port) is None]
        if not allowed:
            first = addresses[0] if addresses else ""
            here = self.allow.check(first, port) if addresses else "no address"
            stream.warn(f"exit refused {host}:{port}: {here}")  # this log may name the address
            told = self.allow.check(first, port, shown=host) if addresses else "no address"
            stream.refuse(bridge, "not_allowed", str(told))  # the connector learns no more
            return
        await stream.dial(bridge, (allowed[0], port))


def parse_target(value: Any) -> tuple[str | None, int]:
    """``"host:port"`` or ``"[v6]:port"`` from a connector; (None, 0) if malformed."""
    if not isinstance(value, str) or len(value) > 300:
        return None, 0
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535 or not host:
        return None, 0
    return host.strip("[]"), int(port_text)
