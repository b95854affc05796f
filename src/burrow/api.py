"""burrow from Python: ``forward()`` a local service (like ngrok-python), ``connect()`` to a
private one (like a local port forward), ``open_socket()`` for drivers that take a socket.

The synchronous forms run the same role objects as the CLI on an event loop in a daemon
thread, so they work from plain scripts, pytest and Lambda handlers alike; the ``a``-prefixed
forms run on the caller's loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from burrow.errors import ConfigError

T = TypeVar("T")
DEFAULT_TIMEOUT = 15.0


class _LoopThread:
    """One background event loop for the synchronous API, started on first use."""

    _instance: _LoopThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="burrow", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _settings(
    relay: str | None,
    *,
    secret: str | None,
    token: str | None,
    fingerprint: str | None,
    ca: str | Path | None,
    insecure: bool,
    state_dir: str | Path | None = None,
    keep_identity: bool = True,
) -> Any:
    """The same ``ClientSettings`` the CLI builds from its flags."""
    from burrow.roles.settings import ClientSettings

    return ClientSettings(
        relay=relay,
        secret=secret,
        token=token,
        fingerprint=fingerprint,
        ca=Path(ca) if ca else None,
        insecure=insecure,
        state_dir=Path(state_dir) if state_dir else None,
        keep_identity=keep_identity,
    )


def _need_relay(relay: str | None) -> None:
    if relay is None:
        raise ConfigError("no relay: pass relay='HOST[:PORT]'")


# --- forward -------------------------------------------------------------------------------


@dataclass
class AsyncTunnel:
    """An open tunnel on the caller's loop; ``url`` is what visitors use."""

    url: str
    name: str
    local: str
    agent: Any = field(repr=False)
    relay: Any = field(repr=False, default=None)

    async def close(self) -> None:
        await self.agent.close()
        if self.relay is not None:
            await self.relay.close()

    async def __aenter__(self) -> AsyncTunnel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def aforward(
    local: int | str,
    proto: str = "http",
    *,
    name: str | None = None,
    relay: str | None = None,
    secret: str | None = None,
    token: str | None = None,
    fingerprint: str | None = None,
    ca: str | Path | None = None,
    insecure: bool = False,
    port: int | None = None,
    basic_auth: list[str] | None = None,
    allow: list[str] | None = None,
    deny: list[str] | None = None,
    host_header: str = "preserve",
    request_header_add: list[str] | None = None,
    request_header_remove: list[str] | None = None,
    response_header_add: list[str] | None = None,
    response_header_remove: list[str] | None = None,
    recorder: Any = None,
    on_event: Any = None,
    state_dir: str | Path | None = None,
) -> AsyncTunnel:
    """Expose ``local`` (a port, ``HOST:PORT`` or a URL) through a relay; with no relay, an
    embedded one on loopback. ``proto`` is ``"http"`` (a public name) or ``"tcp"``."""
    from burrow.kinds import http_service, tcp_service
    from burrow.node import embedded_relay
    from burrow.roles.agent import Agent, AgentConfig

    settings = _settings(
        relay,
        secret=secret,
        token=token,
        fingerprint=fingerprint,
        ca=ca,
        insecure=insecure,
        state_dir=state_dir,
    )
    settings.check()
    spec: Any
    if proto == "http":
        spec = http_service(
            str(local),
            name=name,
            recorder=recorder,
            host_header=host_header,
            basic_auth=basic_auth,
            allow=allow,
            deny=deny,
            request_header_add=request_header_add,
            request_header_remove=request_header_remove,
            response_header_add=response_header_add,
            response_header_remove=response_header_remove,
        )
        local_text = spec.options.local_address
    elif proto == "tcp":
        spec = tcp_service(str(local), port=port, name=name)
        local_text = "{}:{}".format(*spec.local)
    else:
        raise ConfigError(f"proto {proto!r}: expected 'http' or 'tcp'")
    embedded = None
    if relay is None:
        embedded = embedded_relay(http=proto == "http")
        await embedded.start()
    try:
        config = settings.build(
            AgentConfig,
            relay=embedded.control_address if embedded is not None else None,
            tunnels=[spec],
        )
    except BaseException:
        if embedded is not None:
            await embedded.close()
        raise
    agent = Agent(config, on_event=on_event)
    try:
        await agent.start()
    except BaseException:
        if embedded is not None:
            await embedded.close()
        raise
    tunnel = agent.tunnels[0]
    url = tunnel.public or ""
    if proto == "tcp" and embedded is not None:
        url = f"tcp://127.0.0.1:{tunnel.port}"
    return AsyncTunnel(
        url=url, name=tunnel.name or spec.key, local=local_text, agent=agent, relay=embedded
    )


class Tunnel:
    """A tunnel run on burrow's background loop: ``with forward(3000) as t: print(t.url)``."""

    def __init__(self, inner: AsyncTunnel, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self.url = inner.url
        self.name = inner.name
        self.local = inner.local
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _LoopThread.get().run(self._inner.close(), self._timeout)

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tunnel(url={self.url!r}, local={self.local!r})"


def forward(
    local: int | str, proto: str = "http", *, timeout: float = DEFAULT_TIMEOUT, **options: Any
) -> Tunnel:
    """Synchronous ``aforward``: returns once the tunnel is ready; close it (or use ``with``)."""
    inner = _LoopThread.get().run(aforward(local, proto, **options), timeout)
    return Tunnel(inner, timeout)


# --- connect ------------------------------------------------------------------------------


class _Connectors:
    """Connectors shared by ``connect()``/``open_socket()`` calls with the same settings."""

    def __init__(self) -> None:
        self.by_key: dict[str, Any] = {}
        self.lock = asyncio.Lock()

    async def get(self, settings: Any) -> Any:
        from burrow.roles.connector import Connector, ConnectorConfig

        key = repr(settings)
        async with self.lock:
            connector = self.by_key.get(key)
            if connector is None or connector.failed is None or connector.failed.done():
                connector = Connector(settings.build(ConnectorConfig))
                await connector.start()
                self.by_key[key] = connector
            return connector

    async def close(self) -> None:
        for connector in list(self.by_key.values()):
            await connector.close()
        self.by_key.clear()


_shared: _Connectors | None = None


def _connectors() -> _Connectors:
    global _shared
    if _shared is None:
        _shared = _Connectors()
        atexit.register(_close_shared)
    return _shared


def _close_shared() -> None:
    if _shared is not None and _LoopThread._instance is not None:
        with contextlib.suppress(Exception):
            _LoopThread.get().run(_shared.close(), 5)


async def _open_stream(connector: Any, service: str, timeout: float) -> Any:
    from burrow.errors import ConnectError
    from burrow.net.channel import ChannelReset

    await connector.ensure_session(timeout)
    channel = connector.open_channel(service)
    try:
        async with asyncio.timeout(timeout):
            await channel.wait_accepted()
    except TimeoutError:
        channel.reset("timeout", "no answer")
        raise ConnectError(f"service {service!r} did not answer within {timeout:.0f} s") from None
    except ChannelReset as exc:
        raise ConnectError(f"cannot reach {service!r}: {exc.reason or exc.code}") from None
    return channel


@contextlib.asynccontextmanager
async def aconnect(
    service: str,
    *,
    relay: str | None = None,
    secret: str | None = None,
    token: str | None = None,
    fingerprint: str | None = None,
    ca: str | Path | None = None,
    insecure: bool = False,
    listen: str = "127.0.0.1:0",
    timeout: float = DEFAULT_TIMEOUT,
) -> AsyncIterator[tuple[str, int]]:
    """A local forwarder to ``service`` on the caller's loop; yields its ``(host, port)``."""
    from burrow.roles.connector import Connector, ConnectorConfig, ListenSpec

    _need_relay(relay)
    settings = _settings(
        relay,
        secret=secret,
        token=token,
        fingerprint=fingerprint,
        ca=ca,
        insecure=insecure,
        keep_identity=False,
    )
    config = settings.build(ConnectorConfig, services=[ListenSpec(service, listen)])
    connector = Connector(config)
    await connector.start()
    try:
        await connector.wait_ready(service, timeout)
        host, _, port = connector.listeners[service].rpartition(":")
        yield host.strip("[]"), int(port)
    finally:
        await connector.close()


@contextlib.contextmanager
def connect(
    service: str, *, timeout: float = DEFAULT_TIMEOUT, **options: Any
) -> Iterator[tuple[str, int]]:
    """``with burrow.connect("db", relay=..., token=...) as (host, port): psycopg.connect(...)``"""
    thread = _LoopThread.get()
    manager = aconnect(service, timeout=timeout, **options)
    address = thread.run(manager.__aenter__(), timeout)
    try:
        yield address
    finally:
        thread.run(manager.__aexit__(None, None, None), timeout)


def open_socket(
    service: str,
    *,
    relay: str | None = None,
    secret: str | None = None,
    token: str | None = None,
    fingerprint: str | None = None,
    ca: str | Path | None = None,
    insecure: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> socket.socket:
    """A connected socket to ``service`` (one end of a socket pair whose other end burrow
    relays), for drivers that accept one: pg8000 ``sock=``, PyMySQL ``connect(sock)``."""
    _need_relay(relay)
    settings = _settings(
        relay,
        secret=secret,
        token=token,
        fingerprint=fingerprint,
        ca=ca,
        insecure=insecure,
        keep_identity=False,
    )
    settings.check()
    ours, theirs = socket.socketpair()

    async def open_() -> None:
        connector = await _connectors().get(settings)
        channel = await _open_stream(connector, service, timeout)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, theirs)
        channel.splice(transport)

    try:
        _LoopThread.get().run(open_(), timeout + 5)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    return ours
