"""``burrow socks``: a SOCKS5 and an HTTP CONNECT proxy in front of a connector.

Targets ``NAME`` or ``NAME.burrow`` reach private services; ``HOST:PORT`` goes to the exit
named with ``--exit`` (the exit resolves the name, so private DNS names work). The reply is
sent only once the far end connected, with the precise code: SOCKS 0x02 not allowed, 0x03/0x04
unreachable, 0x05 refused, 0x06 timed out; HTTP 403/502/504 with a ``Burrow-Error`` header.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
from typing import Any, Protocol, cast

from burrow.errors import ConnectError
from burrow.events import EventSink, emit
from burrow.net.channel import Channel, ChannelReset
from burrow.wire import connect_proxy, socks

log = logging.getLogger("burrow.socks")

ACCEPT_TIMEOUT = 30.0
#: After a wrong password, the answer waits this long, doubled at each failure past the
#: first few (typos), when the source is also locked out for a while.
PENALTY_BASE = 0.25
FREE_FAILURES = 3
MAX_PENALTY = 30.0
MAX_TRACKED_SOURCES = 4096


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class StreamOpener(Protocol):
    """What the proxy needs of a connector: streams to services, opened on demand."""

    on_event: EventSink | None

    async def ready_for_streams(self) -> None:
        """Wait until new streams can be opened (a session check after a freeze, say)."""
        ...

    def open_channel(self, service: str, target: str | None = None) -> Channel:
        """A stream to ``service`` (an exit's ``target``); ``ConnectError`` with no session."""
        ...


def route_target(host: str, port: int, exit_name: str | None) -> tuple[str, str | None] | None:
    """(service, exit target) for a proxy request, or None when nothing can serve it."""
    name = host.lower().rstrip(".")
    if name.endswith(".burrow"):
        return name[: -len(".burrow")], None
    is_ip = True
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        is_ip = False
    if not is_ip and "." not in name:
        return name, None
    if exit_name is None:
        return None
    target = f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
    return exit_name, target


class _ProxyClient(asyncio.Protocol):
    """One client of the proxy, SOCKS5 or HTTP CONNECT, until its stream is accepted."""

    def __init__(self, server: ProxyServer, kind: str) -> None:
        self.server = server
        self.kind = kind
        self.transport: asyncio.Transport | None = None
        self.socks = socks.SocksServer(auth=server.check_auth if server.credentials else None)
        self.http = connect_proxy.ConnectParser()
        self.task: asyncio.Task[None] | None = None
        self.source = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.source = str(peer[0]) if isinstance(peer, tuple) else "local"
        if self.server.penalised(self.source):
            self.transport.close()  # still guessing: no more tries until the pause is over

    def data_received(self, data: bytes) -> None:
        if self.task is not None:  # the request is in: later bytes wait in the parser
            self._feed_early(data)
            return
        try:
            if self.kind == "socks":
                self._socks(data)
            else:
                self._http(data)
        except socks.SocksError:
            self._flush_close()
        except connect_proxy.ConnectProxyError as exc:
            self._write_close(exc.response())

    def _feed_early(self, data: bytes) -> None:
        try:
            if self.kind == "socks":
                self.socks.receive_data(data)
            else:
                self.http.receive_data(data)
        except (socks.SocksError, connect_proxy.ConnectProxyError):
            if self.transport is not None:
                self.transport.abort()

    def _socks(self, data: bytes) -> None:
        for event in self.socks.receive_data(data):
            if isinstance(event, socks.AuthFailed):
                delay = self.server.failed(self.source)
                asyncio.get_running_loop().call_later(delay, self._flush_close)
                return
            if isinstance(event, socks.ConnectRequest):
                self._flush()
                self.task = asyncio.get_running_loop().create_task(
                    self._open(event.host, event.port)
                )
                return
        self._flush()
        if self.socks.should_close:
            self._flush_close()

    def _http(self, data: bytes) -> None:
        request = self.http.receive_data(data)
        if request is None:
            return
        if self.server.credentials and not (
            request.credentials is not None and self.server.check_auth(*request.credentials)
        ):
            if request.credentials is not None:  # a wrong password, not a first try without
                delay = self.server.failed(self.source)
                answer = connect_proxy.proxy_auth_required()
                asyncio.get_running_loop().call_later(delay, self._write_close, answer)
            else:
                self._write_close(connect_proxy.proxy_auth_required())
            return
        self.task = asyncio.get_running_loop().create_task(self._open(request.host, request.port))

    async def _open(self, host: str, port: int) -> None:
        server = self.server
        routed = route_target(host, port, server.exit_name)
        if routed is None:
            self._fail(
                "not_allowed",
                f"{host}:{port} is not a burrow service and no --exit is configured",
            )
            return
        service, target = routed
        await server.connector.ready_for_streams()
        attempts = [(service, target)]
        if target is None and server.exit_name is not None and not host.endswith(".burrow"):
            # A bare name may be a private service or a host on the exit's network
            # (localhost, a Kubernetes service): try the service, then the exit.
            attempts.append((server.exit_name, f"{host}:{port}"))
        for index, (service, target) in enumerate(attempts):
            try:
                channel = server.connector.open_channel(service, target)
            except ConnectError as exc:
                self._fail("unreachable", str(exc))
                return
            try:
                async with asyncio.timeout(ACCEPT_TIMEOUT):
                    await channel.wait_accepted()
            except TimeoutError:
                channel.reset("timeout", "no answer")
                self._fail("timeout", f"{service} did not answer within {ACCEPT_TIMEOUT:.0f} s")
                return
            except ChannelReset as exc:
                if exc.code in ("no_such_tunnel", "not_allowed") and index + 1 < len(attempts):
                    continue
                self._fail(exc.code, exc.reason or exc.code)
                return
            break
        transport = self.transport
        if transport is None:
            channel.reset("cancelled", "client went away")
            return
        if self.kind == "socks":
            self.socks.reply(socks.SUCCEEDED)
            transport.write(self.socks.data_to_send())
            early = self.socks.trailing_data()
        else:
            transport.write(connect_proxy.connect_ok())
            early = self.http.trailing_data()
        channel.splice(transport, early)  # from here on, Protocols only
        emit(server.connector.on_event, "proxied", service=service, target=target)

    def _fail(self, code: str, reason: str) -> None:
        emit(self.server.connector.on_event, "warning", message=f"proxy: {reason}")
        if self.kind == "socks":
            try:
                self.socks.reply(socks.reply_code_for_reset(code))
            except socks.SocksStateError:
                pass
            self._flush_close()
        else:
            self._write_close(connect_proxy.reset_response(code, reason))

    def _flush(self) -> None:
        out = self.socks.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def _flush_close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _write_close(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class ProxyServer:
    """SOCKS5 and/or HTTP CONNECT listeners over one connector."""

    def __init__(
        self,
        connector: StreamOpener,
        *,
        exit_name: str | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.connector = connector
        self.exit_name = exit_name
        self.credentials = credentials
        self.servers: list[asyncio.Server] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # source -> (failures, paused until)

    def check_auth(self, user: str, password: str) -> bool:
        """Constant time, and the same time whatever the lengths: digests are compared."""
        if self.credentials is None:
            return True
        want_user, want_password = self.credentials
        user_ok = hmac.compare_digest(_digest(user), _digest(want_user))
        password_ok = hmac.compare_digest(_digest(password), _digest(want_password))
        return user_ok and password_ok

    def failed(self, source: str) -> float:
        """A wrong password from ``source``: how long to wait before answering it. A few
        typos cost a short pause each; past ``FREE_FAILURES`` each failure doubles the pause
        (up to ``MAX_PENALTY``), during which ``source``'s new connections are closed at
        once, so guessing runs at a few tries a minute."""
        loop = asyncio.get_running_loop()
        count, _ = self._failures.get(source, (0, 0.0))
        count += 1
        excess = max(0, count - FREE_FAILURES)
        delay = float(min(MAX_PENALTY, PENALTY_BASE * 2 ** min(excess, 16)))
        locked = loop.time() + 2 * delay if excess else 0.0  # the answer, then a pause
        self._failures[source] = (count, locked)
        if len(self._failures) > MAX_TRACKED_SOURCES:  # bounded: forget the oldest
            self._failures.pop(next(iter(self._failures)))
        return delay

    def penalised(self, source: str) -> bool:
        entry = self._failures.get(source)
        return entry is not None and asyncio.get_running_loop().time() < entry[1]

    async def listen(self, kind: str, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _ProxyClient(self, kind), host, port, reuse_address=True, backlog=512
        )
        self.servers.append(server)
        name = server.sockets[0].getsockname()
        self.addresses[kind] = (name[0], name[1])
        return self.addresses[kind]

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def describe(self) -> dict[str, Any]:
        return {kind: f"{a[0]}:{a[1]}" for kind, a in self.addresses.items()}
