"""The agent: dials out to a relay, offers services on it, and serves the streams that come.

Services: a public TCP port (``tcp``), a TCP service reachable only by connectors holding a
token for its name (``private``), a public HTTP name (``http``), and an ``exit`` that dials
allow-listed addresses for connectors. Every one is registered again, with the same port or
name, after a reconnect (see ``RelayClient``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from burrow.allowlist import AllowList
from burrow.errors import ConfigError, TunnelError
from burrow.events import EventSink, emit, format_hostport
from burrow.net.bridge import StreamBridge
from burrow.net.connection import SessionConnection
from burrow.roles.client import ClientConfig, RelayClient
from burrow.wire import proxyproto

log = logging.getLogger("burrow.agent")

LOCAL_DIAL_TIMEOUT = 10.0


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


@dataclass
class HttpTunnelSpec:
    """A local web service, public as NAME.DOMAIN on the relay's HTTP listener."""

    options: Any  # burrow.http.policy.HttpOptions
    name: str | None = None
    kind = "http"

    @property
    def key(self) -> str:
        return self.name or f"http:{format_hostport(*self.options.local)}"


@dataclass
class ExitSpec:
    """Dial allow-listed addresses on connectors' behalf, like a bastion with no sudo."""

    name: str
    allow: AllowList
    kind = "exit"

    @property
    def key(self) -> str:
        return f"exit:{self.name}"


Spec = TcpTunnelSpec | HttpTunnelSpec | ExitSpec


@dataclass
class AgentConfig(ClientConfig):
    tunnels: list[Spec] = field(default_factory=list)
    state_dir: Path | None = None  # where ports and names are remembered across restarts
    public_host: str | None = None  # override the host shown in public addresses
    recorder: Any = None  # burrow.http.record.Recorder for HTTP tunnels (the inspector)


@dataclass(eq=False)
class ActiveTunnel:
    spec: Spec
    port: int | None = None
    name: str | None = None
    public: str | None = None  # what visitors use: HOST:PORT, a URL, or the service name
    connections: int = 0
    open_connections: int = 0


class Agent(RelayClient):
    """``await start()`` returns once every tunnel is ready (or raises); ``close()`` ends all."""

    role_name = "agent"

    def __init__(self, config: AgentConfig, *, on_event: EventSink | None = None) -> None:
        if not config.tunnels:
            raise ConfigError("no tunnels to open")
        super().__init__(config, on_event=on_event)
        self.config = config
        self.tunnels = [ActiveTunnel(spec) for spec in config.tunnels]
        self._by_port: dict[int, ActiveTunnel] = {}
        self._by_name: dict[tuple[str, str], ActiveTunnel] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._bridges: set[StreamBridge] = set()
        self._channels: set[Any] = set()
        self._remembered = self._load_ports()

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def on_close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for bridge in list(self._bridges):
            bridge.close()
        for channel in list(self._channels):
            channel.reset("cancelled", "agent shutting down")

    # --- registration ------------------------------------------------------------------------

    async def on_session(self, conn: SessionConnection) -> None:
        self._by_port.clear()
        self._by_name.clear()
        for tunnel in self.tunnels:
            await self._register(conn, tunnel)

    async def _register(self, conn: SessionConnection, tunnel: ActiveTunnel) -> None:
        spec = tunnel.spec
        message: dict[str, Any] = {"op": "register", "kind": spec.kind, "key": spec.key}
        if isinstance(spec, TcpTunnelSpec) and not spec.private:
            message["port"] = spec.port or tunnel.port or self._remembered.get(spec.key)
            message["exact"] = spec.port is not None
        else:
            remembered = self._remembered.get(spec.key)
            message["name"] = (
                spec.name or tunnel.name or (remembered if isinstance(remembered, str) else None)
            )
            message["exact"] = spec.name is not None
        reply = await self.request(conn, message)
        if reply.get("op") == "error":
            raise TunnelError(
                f"relay {self.relay_label} refused {spec.kind} tunnel {spec.key}: "
                f"{reply.get('message')}",
                str(reply.get("code", "refused")),
            )
        event: dict[str, Any] = {"kind": spec.kind, "name": spec.key}
        if isinstance(spec, TcpTunnelSpec) and not spec.private:
            port = int(reply["port"])
            tunnel.port = port
            self._by_port[port] = tunnel
            host = self.config.public_host or reply.get("host") or self.config.relay[0]
            tunnel.public = format_hostport(str(host), port)
            self._remember(spec.key, port)
            event.update(public=tunnel.public, local=format_hostport(*spec.local))
        else:
            name = str(reply["name"])
            tunnel.name = name
            self._by_name[(spec.kind, name)] = tunnel
            self._remember(spec.key, name)
            event["name"] = name
            if isinstance(spec, HttpTunnelSpec):
                tunnel.public = str(reply.get("url") or name)
                spec.options.name = name
                spec.options.public_url = tunnel.public
                event.update(url=tunnel.public, local=format_hostport(*spec.options.local))
            elif isinstance(spec, ExitSpec):
                tunnel.public = name
                event.update(allow=str(spec.allow))
            else:
                tunnel.public = name
                event.update(local=format_hostport(*spec.local))
        emit(self.on_event, "tunnel_ready", **event)

    def on_message(self, conn: SessionConnection, message: dict[str, Any]) -> None:
        if message.get("op") == "tunnel_moved":
            self._fail(
                TunnelError(
                    f"another agent with this identity took over tunnel {message.get('key')}",
                    "moved",
                )
            )

    # --- streams -----------------------------------------------------------------------------

    def on_stream(self, conn: SessionConnection, stream_id: int, info: dict[str, Any]) -> None:
        port = info.get("port")
        if isinstance(port, int):
            tunnel = self._by_port.get(port)
        elif isinstance(info.get("http"), str):
            tunnel = self._by_name.get(("http", info["http"]))
        elif isinstance(info.get("service"), str):
            name = info["service"]
            tunnel = self._by_name.get(("private", name)) or self._by_name.get(("exit", name))
        else:
            tunnel = None
        if tunnel is None:
            conn.session.reset_stream(stream_id, "no_such_tunnel", "this agent has no such tunnel")
            return
        tunnel.connections += 1
        tunnel.open_connections += 1
        spec = tunnel.spec
        if isinstance(spec, HttpTunnelSpec):
            from burrow.net.channel import Channel

            # Attach now: DATA for this stream may follow in the same read.
            channel = Channel(conn)
            channel.info = info
            channel.attach(stream_id)
            channel.accept()
            self._channels.add(channel)
            task = self._spawn(self._serve_http(channel, info, tunnel))
            # A visitor that goes away (reset, or closed while a request is under way, as
            # nginx reads it) stops the exchange: the local service is not kept waiting.
            channel.on_peer_reset = task.cancel
            channel.on_peer_end = partial(_abort_if_busy, task, channel)
            return
        if isinstance(spec, ExitSpec):
            target = info.get("target")
            bridge = self._bridge(conn, stream_id, tunnel, b"")
            self._spawn(self._dial_exit(bridge, tunnel, spec, target))
            return
        header = b""
        if spec.proxy_protocol:
            header = proxyproto.encode(
                spec.proxy_protocol,  # type: ignore[arg-type]
                _address(info.get("src")),
                _address(info.get("dst")),
            )
        bridge = self._bridge(conn, stream_id, tunnel, header)
        self._spawn(self._dial(bridge, tunnel, spec.local))

    def _bridge(
        self, conn: SessionConnection, stream_id: int, tunnel: ActiveTunnel, header: bytes
    ) -> StreamBridge:
        bridge = StreamBridge(
            conn, header=header, on_done=partial(self._bridge_done, tunnel=tunnel)
        )
        bridge.attach(stream_id)
        self._bridges.add(bridge)
        return bridge

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _dial(
        self, bridge: StreamBridge, tunnel: ActiveTunnel, local: tuple[str, int]
    ) -> None:
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
            bridge.conn.session.accept_stream(bridge.stream_id)
            bridge.conn.flush()
            return
        emit(self.on_event, "warning", message=why, tunnel=tunnel.spec.key)
        self._refuse(bridge, code, why)

    async def _dial_exit(
        self, bridge: StreamBridge, tunnel: ActiveTunnel, spec: ExitSpec, target: Any
    ) -> None:
        """Resolve here (private DNS names work), check every address, dial the first allowed."""
        host, port = _target(target)
        if host is None:
            self._refuse(bridge, "not_allowed", f"bad exit target {target!r}")
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(LOCAL_DIAL_TIMEOUT):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, TimeoutError):
            self._refuse(bridge, "unreachable", f"{host} does not resolve at exit {spec.name}")
            return
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        allowed = [a for a in addresses if spec.allow.check(a, port) is None]
        if not allowed:
            reason = spec.allow.check(addresses[0], port) if addresses else "no address"
            emit(
                self.on_event,
                "warning",
                message=f"exit refused {host}:{port}: {reason}",
                tunnel=spec.key,
            )
            self._refuse(bridge, "not_allowed", str(reason))
            return
        await self._dial(bridge, tunnel, (allowed[0], port))

    def _refuse(self, bridge: StreamBridge, code: str, why: str) -> None:
        bridge.on_reset(code, why)
        bridge.conn.session.reset_stream(bridge.stream_id, code, why)
        bridge.conn.flush()

    async def _serve_http(self, channel: Any, info: dict[str, Any], tunnel: ActiveTunnel) -> None:
        from burrow.http.proxy import serve_http

        spec = tunnel.spec
        assert isinstance(spec, HttpTunnelSpec)
        try:
            await serve_http(
                channel,
                channel,
                options=spec.options,
                peer=_address(info.get("src")),
                scheme=str(info.get("scheme", "http")),
                recorder=_BusyMarker(channel, self.config.recorder),
            )
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("HTTP stream failed")
            channel.reset("error", "agent error")
        finally:
            await _finish_http(channel)
            self._channels.discard(channel)
            tunnel.open_connections -= 1

    def _bridge_done(self, bridge: StreamBridge, tunnel: ActiveTunnel) -> None:
        self._bridges.discard(bridge)
        tunnel.open_connections -= 1

    # --- remembered ports ------------------------------------------------------------------

    def _ports_file(self) -> Path | None:
        if self.config.state_dir is None:
            return None
        return self.config.state_dir / "ports.json"

    def _load_ports(self) -> dict[str, int | str]:
        path = self._ports_file()
        if path is None or not path.is_file() or path.stat().st_size > 1 << 20:
            return {}
        try:
            data = json.loads(path.read_text())
            ports = data.get(self.relay_label, {})
            return {str(k): v for k, v in ports.items() if isinstance(v, int | str)}
        except (ValueError, OSError, AttributeError):
            return {}

    def _remember(self, key: str, value: int | str) -> None:
        self._remembered[key] = value
        path = self._ports_file()
        if path is None:
            return
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
            if not isinstance(data, dict):
                data = {}
        except (ValueError, OSError):
            data = {}
        data[self.relay_label] = dict(self._remembered)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot remember ports in %s: %s", path, exc)


def load_or_create_identity(path: Path) -> Ed25519PrivateKey:
    """The agent's Ed25519 identity, kept at ``path`` (mode 0600) so leases survive restarts."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        os.replace(tmp, path)
        return key
    except OSError as exc:
        raise ConfigError(f"cannot read the agent identity {path}: {exc.strerror}") from None
    try:
        loaded = load_pem_private_key(data, password=None)
    except ValueError:
        raise ConfigError(
            f"{path} is not an agent identity key; delete it to make a new one"
        ) from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key; delete it to make a new one")
    return loaded


class _BusyMarker:
    """A recorder that marks the channel busy from a request's head to its response's end,
    so a visitor closing in between is taken as gone, and passes exchanges on."""

    def __init__(self, channel: Any, inner: Any) -> None:
        self.channel = channel
        self.inner = inner

    def begin(self, exchange: Any) -> None:
        self.channel.busy = True
        if self.inner is not None:
            self.inner.begin(exchange)

    def end(self, exchange: Any) -> None:
        self.channel.busy = False
        if self.inner is not None:
            self.inner.end(exchange)


def _abort_if_busy(task: asyncio.Task[None], channel: Any) -> None:
    """The visitor half-closed: if a request is still being served, treat it as gone."""
    if getattr(channel, "busy", False):
        task.cancel()


async def _finish_http(channel: Any) -> None:
    """End a visitor's stream after the proxy is done with it: half-close after the last
    response, and if the visitor is still sending (an upload answered early, say with 401),
    reset once the answer is on its way, so the relay stops waiting for it to finish."""
    channel.close()
    if channel.at_eof():
        return
    try:
        async with asyncio.timeout(5):
            await channel.drain()
    except (TimeoutError, ConnectionError):
        pass
    channel.reset("closed", "the agent finished this connection")


def _address(value: Any) -> tuple[str, int]:
    if isinstance(value, list) and len(value) == 2:
        try:
            return str(value[0]), int(value[1])
        except (TypeError, ValueError):
            pass
    return ("", 0)


def _target(value: Any) -> tuple[str | None, int]:
    """``"host:port"`` or ``"[v6]:port"`` from a connector; (None, 0) if malformed."""
    if not isinstance(value, str) or len(value) > 300:
        return None, 0
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535 or not host:
        return None, 0
    return host.strip("[]"), int(port_text)
