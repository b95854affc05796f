"""The agent: dials out to a relay, registers tunnels, and joins each visitor's stream to the
local service. It survives its relay: heartbeats notice a dead session, reconnects back off
exponentially with jitter, and every tunnel asks for its previous port again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import ssl
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

from burrow import __version__
from burrow.errors import (
    AuthError,
    BurrowError,
    ConfigError,
    ConnectError,
    TLSVerifyError,
    TunnelError,
)
from burrow.events import EventSink, emit, format_hostport
from burrow.net.bridge import StreamBridge
from burrow.net.connection import SessionConnection
from burrow.wire import proxyproto
from burrow.wire.errors import HandshakeRejected
from burrow.wire.session import Role, Session

log = logging.getLogger("burrow.agent")

CONNECT_TIMEOUT = 10.0
LOCAL_DIAL_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


@dataclass
class TcpTunnelSpec:
    local: tuple[str, int]
    port: int | None = None  # the public port asked for; None: any (or the previous one)
    name: str | None = None
    proxy_protocol: str | None = None  # "v1" or "v2"

    @property
    def key(self) -> str:
        return self.name or f"tcp:{format_hostport(*self.local)}"


@dataclass
class AgentConfig:
    relay: tuple[str, int]
    secret: str | None = None
    trust: Any = None  # burrow.net.tls.TrustPolicy; None means plaintext (--insecure)
    tunnels: list[TcpTunnelSpec] = field(default_factory=list)
    identity_key: Ed25519PrivateKey | None = None
    state_dir: Path | None = None  # where ports are remembered across restarts
    connect_timeout: float = CONNECT_TIMEOUT
    retry_forever: bool = False
    public_host: str | None = None  # override the host shown in public addresses


@dataclass(eq=False)
class ActiveTunnel:
    spec: TcpTunnelSpec
    port: int | None = None
    public: str | None = None
    connections: int = 0
    open_connections: int = 0


class Agent:
    """``await start()`` returns once every tunnel is ready (or raises); ``close()`` ends all."""

    def __init__(self, config: AgentConfig, *, on_event: EventSink | None = None) -> None:
        if not config.tunnels:
            raise ConfigError("no tunnels to open")
        self.config = config
        self.on_event = on_event
        self.identity = config.identity_key or Ed25519PrivateKey.generate()
        self.tunnels = [ActiveTunnel(spec) for spec in config.tunnels]
        self.conn: SessionConnection | None = None
        self.failed: asyncio.Future[BurrowError] | None = None
        self._by_port: dict[int, ActiveTunnel] = {}
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_request = 1
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._dials: set[asyncio.Task[None]] = set()
        self._bridges: set[StreamBridge] = set()
        self._remembered = self._load_ports()

    @property
    def relay_label(self) -> str:
        return format_hostport(*self.config.relay)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.failed = asyncio.get_running_loop().create_future()
        conn = await self._connect_first()
        try:
            await self._register_all(conn)
        except BaseException:
            conn.close("registration failed")
            raise
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(conn))

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except (asyncio.CancelledError, Exception):
                pass
        for task in list(self._dials):
            task.cancel()
        for bridge in list(self._bridges):
            bridge.close()
        if self.conn is not None:
            self.conn.close("agent shutting down")
            try:
                async with asyncio.timeout(2):
                    await asyncio.shield(self.conn.closed)
            except TimeoutError:
                self.conn.abort("agent shutting down")

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_failed(self) -> BurrowError:
        """Wait until the agent gives up for good (auth or certificate changed, port taken)."""
        assert self.failed is not None
        return await self.failed

    # --- connecting ------------------------------------------------------------------------

    async def _connect_first(self) -> SessionConnection:
        """Connect, retrying refusals within ``connect_timeout`` (the relay may start later)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.connect_timeout
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            try:
                return await self._connect(
                    max(0.5, remaining) if not self.config.retry_forever else 10.0
                )
            except ConnectError as exc:
                if not getattr(exc, "retryable", False):
                    raise
                attempt += 1
                delay = min(_backoff(attempt), 1.0)
                if not self.config.retry_forever and loop.time() + delay >= deadline:
                    raise ConnectError(
                        f"{exc}; gave up after {self.config.connect_timeout:.0f} s"
                    ) from None
                emit(
                    self.on_event,
                    "reconnecting",
                    relay=self.relay_label,
                    attempt=attempt,
                    delay=round(delay, 2),
                    reason=str(exc),
                )
                await asyncio.sleep(delay)

    async def _connect(self, timeout: float) -> SessionConnection:
        host, port = self.config.relay
        label = self.relay_label
        trust = self.config.trust
        context: ssl.SSLContext | None = trust.ssl_context() if trust is not None else None
        loop = asyncio.get_running_loop()
        session = Session(
            Role.CLIENT,
            secret=self.config.secret,
            identity_key=self.identity,
            software=f"burrow/{__version__}",
        )

        def factory() -> SessionConnection:
            return SessionConnection(
                session, on_stream=self._on_stream, on_control=self._on_control, peer_label=label
            )

        try:
            async with asyncio.timeout(timeout):
                transport, conn = await loop.create_connection(
                    factory,
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                    ssl_handshake_timeout=timeout if context is not None else None,
                )
        except TimeoutError:
            raise _retryable(f"relay {label} did not answer within {timeout:.0f} s") from None
        except socket.gaierror:
            raise ConnectError(
                f"relay name {host!r} does not resolve; check --to / BURROW_RELAY"
            ) from None
        except ssl.SSLError as exc:
            from burrow.net.tls import describe_ssl_error

            raise describe_ssl_error(exc, label) from None
        except ConnectionRefusedError:
            raise _retryable(
                f"relay {label} refused the connection; is `burrow relay` running there?"
            ) from None
        except OSError as exc:
            raise _retryable(f"cannot reach relay {label}: {exc.strerror or exc}") from None
        try:
            if context is not None:
                ssl_object = transport.get_extra_info("ssl_object")
                fingerprint = trust.verify(ssl_object, label, on_first_use=self._first_use)
                log.debug("relay %s certificate %s", label, fingerprint)
            session.start()
            conn.flush()
            async with asyncio.timeout(timeout):
                await conn.handshake_done
        except HandshakeRejected as exc:
            conn.abort("rejected")
            if exc.code == "auth":
                raise AuthError(f"relay {label} refused this agent: {exc.message}") from None
            raise ConnectError(f"relay {label} refused this agent: {exc.message}") from None
        except TimeoutError:
            conn.abort("handshake timeout")
            raise _retryable(
                f"relay {label} did not complete the handshake within {timeout:.0f} s"
            ) from None
        except ConnectionError as exc:
            hint = "" if context is not None else "; if the relay uses TLS, drop --insecure"
            raise _retryable(
                f"relay {label} closed the connection during the handshake ({exc}){hint}"
            ) from None
        except BaseException:
            conn.abort("failed")
            raise
        self.conn = conn
        emit(
            self.on_event,
            "connected",
            relay=label,
            session=session.session_id,
            tls=context is not None,
        )
        return conn

    def _first_use(self, relay_key: str, fingerprint: str) -> None:
        emit(
            self.on_event,
            "warning",
            message=f"trusting relay {relay_key} on first use: {fingerprint}",
        )

    async def _supervise(self, conn: SessionConnection) -> None:
        assert self.failed is not None
        attempt = 0
        while not self._closing:
            reason = await asyncio.shield(conn.closed)
            if self._closing:
                return
            emit(self.on_event, "session_lost", relay=self.relay_label, reason=reason)
            while not self._closing:
                attempt += 1
                delay = _backoff(attempt)
                emit(
                    self.on_event,
                    "reconnecting",
                    relay=self.relay_label,
                    attempt=attempt,
                    delay=round(delay, 2),
                    reason=reason,
                )
                await asyncio.sleep(delay)
                try:
                    conn = await self._connect(CONNECT_TIMEOUT)
                    await self._register_all(conn)
                except ConnectError as exc:
                    if getattr(exc, "retryable", False):
                        reason = str(exc)
                        continue
                    self._fail(exc)
                    return
                except (AuthError, TLSVerifyError, TunnelError) as exc:
                    self._fail(exc)
                    return
                except (ConnectionError, TimeoutError) as exc:
                    reason = str(exc) or type(exc).__name__
                    continue
                attempt = 0
                break

    def _fail(self, exc: BurrowError) -> None:
        emit(self.on_event, "error", message=str(exc))
        if self.failed is not None and not self.failed.done():
            self.failed.set_result(exc)

    # --- tunnels ---------------------------------------------------------------------------

    async def _register_all(self, conn: SessionConnection) -> None:
        self._by_port.clear()
        for tunnel in self.tunnels:
            await self._register(conn, tunnel)

    async def _register(self, conn: SessionConnection, tunnel: ActiveTunnel) -> None:
        spec = tunnel.spec
        want = spec.port or tunnel.port or self._remembered.get(spec.key)
        reply = await self._request(
            conn,
            {
                "op": "register",
                "kind": "tcp",
                "key": spec.key,
                "port": want,
                "exact": spec.port is not None,
            },
        )
        if reply.get("op") == "error":
            raise TunnelError(
                f"relay {self.relay_label} refused tunnel {spec.key}: {reply.get('message')}",
                str(reply.get("code", "refused")),
            )
        port = int(reply["port"])
        tunnel.port = port
        self._by_port[port] = tunnel
        host = self.config.public_host or reply.get("host") or self.config.relay[0]
        tunnel.public = format_hostport(str(host), port)
        self._remember_port(spec.key, port)
        emit(
            self.on_event,
            "tunnel_ready",
            kind="tcp",
            public=tunnel.public,
            local=format_hostport(*spec.local),
            name=spec.key,
        )

    async def _request(self, conn: SessionConnection, message: dict[str, Any]) -> dict[str, Any]:
        request_id = self._next_request
        self._next_request += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        try:
            conn.send_control({**message, "id": request_id})
            async with asyncio.timeout(REQUEST_TIMEOUT):
                waits: set[asyncio.Future[Any]] = {future, conn.closed}
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if future in done:
                return future.result()
            raise ConnectionError(f"session closed: {conn.closed.result()}")
        finally:
            self._requests.pop(request_id, None)

    def _on_control(self, conn: SessionConnection, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        future = self._requests.get(request_id) if isinstance(request_id, int) else None
        if future is not None and not future.done():
            future.set_result(message)
        elif message.get("op") == "tunnel_moved":
            self._fail(
                TunnelError(
                    "another agent with this identity took over the tunnel on port "
                    f"{message.get('port')}",
                    "moved",
                )
            )

    # --- streams ---------------------------------------------------------------------------

    def _on_stream(self, conn: SessionConnection, stream_id: int, info: dict[str, Any]) -> None:
        port = info.get("port")
        tunnel = self._by_port.get(port) if isinstance(port, int) else None
        if tunnel is None:
            conn.session.reset_stream(stream_id, "no_such_tunnel", "this agent has no such tunnel")
            return
        header = b""
        if tunnel.spec.proxy_protocol:
            header = proxyproto.encode(
                tunnel.spec.proxy_protocol,  # type: ignore[arg-type]
                _address(info.get("src")),
                _address(info.get("dst")),
            )
        bridge = StreamBridge(
            conn, header=header, on_done=partial(self._bridge_done, tunnel=tunnel)
        )
        bridge.attach(stream_id)
        self._bridges.add(bridge)
        tunnel.connections += 1
        tunnel.open_connections += 1
        task = asyncio.get_running_loop().create_task(self._dial(bridge, tunnel))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(self, bridge: StreamBridge, tunnel: ActiveTunnel) -> None:
        host, port = tunnel.spec.local
        local = format_hostport(host, port)
        loop = asyncio.get_running_loop()
        code, why = "refused", ""
        try:
            async with asyncio.timeout(LOCAL_DIAL_TIMEOUT):
                await loop.create_connection(lambda: bridge, host, port)
        except ConnectionRefusedError:
            why = f"local service {local} refused the connection"
        except TimeoutError:
            code, why = (
                "timeout",
                f"local service {local} did not answer within {LOCAL_DIAL_TIMEOUT:.0f} s",
            )
        except OSError as exc:
            code, why = "unreachable", f"cannot reach local service {local}: {exc.strerror or exc}"
        else:
            bridge.conn.session.accept_stream(bridge.stream_id)
            bridge.conn.flush()
            return
        emit(self.on_event, "warning", message=why, tunnel=tunnel.spec.key)
        bridge.on_reset(code, why)
        bridge.conn.session.reset_stream(bridge.stream_id, code, why)
        bridge.conn.flush()

    def _bridge_done(self, bridge: StreamBridge, tunnel: ActiveTunnel) -> None:
        self._bridges.discard(bridge)
        tunnel.open_connections -= 1

    # --- remembered ports ------------------------------------------------------------------

    def _ports_file(self) -> Path | None:
        if self.config.state_dir is None:
            return None
        return self.config.state_dir / "ports.json"

    def _load_ports(self) -> dict[str, int]:
        path = self._ports_file()
        if path is None or not path.is_file() or path.stat().st_size > 1 << 20:
            return {}
        try:
            data = json.loads(path.read_text())
            ports = data.get(self.relay_label, {})
            return {str(k): int(v) for k, v in ports.items() if isinstance(v, int)}
        except (ValueError, OSError, AttributeError):
            return {}

    def _remember_port(self, key: str, port: int) -> None:
        self._remembered[key] = port
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


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter, capped at 30 s."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** min(attempt - 1, 16)))
    return random.uniform(ceiling / 2, ceiling)


def _retryable(message: str) -> ConnectError:
    exc = ConnectError(message)
    exc.retryable = True  # type: ignore[attr-defined]
    return exc


def _address(value: Any) -> tuple[str, int]:
    if isinstance(value, list) and len(value) == 2:
        return str(value[0]), int(value[1])
    return ("", 0)
