"""The relay: the rendezvous agents dial out to. It serves the control port (TLS unless told
otherwise), keeps one session per agent, and opens a public TCP port per TCP tunnel whose
connections it hands to the agent as streams.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from burrow.errors import ConfigError, TunnelError
from burrow.events import EventSink, emit, format_hostport
from burrow.net.bridge import StreamBridge, visitor_info
from burrow.net.connection import SessionConnection
from burrow.roles.leases import LeaseTable
from burrow.wire.session import Role, Session

log = logging.getLogger("burrow.relay")

DEFAULT_CONTROL_PORT = 7835
HANDSHAKE_TIMEOUT = 10.0
#: How many random ports to try before giving up (bore's figure: ~99.999% success at 15% free).
RANDOM_PORT_TRIES = 150
#: Names of HTTP tunnels and private services: one DNS label.
NAME_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DOMAIN = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


@dataclass
class RelayConfig:
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_CONTROL_PORT
    secret: str | None = None
    min_port: int = 1024
    max_port: int = 65535
    bind_tunnels: str | None = None  # default: the control listener's host
    state_dir: Path | None = None
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    hostnames: tuple[str, ...] = ()
    public_host: str | None = None
    lease_grace: float = 60.0
    heartbeat: float = 5.0
    admin: tuple[str, int] | None = None
    http_listen: tuple[str, int] | None = None
    https_listen: tuple[str, int] | None = None
    domain: str = "localhost"
    #: Route requests for any other Host (127.0.0.1:PORT) to the one HTTP tunnel, if only one:
    #: for embedded relays, whose clients may not resolve NAME.localhost.
    http_fallback: bool = False

    def validate(self) -> None:
        if not 1 <= self.min_port <= 65535 or not 1 <= self.max_port <= 65535:
            raise ConfigError("--min-port and --max-port must be between 1 and 65535")
        if self.min_port > self.max_port:
            raise ConfigError(
                f"port range is empty: --min-port {self.min_port} > --max-port {self.max_port}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together; give both or neither")
        if self.lease_grace < 0:
            raise ConfigError("--lease-grace must not be negative")
        if not 0.05 <= self.heartbeat <= 3600:
            raise ConfigError("--heartbeat must be between 0.05 and 3600 seconds")
        if not _DOMAIN.fullmatch(self.domain):
            raise ConfigError(
                f"--domain {self.domain!r} is not a domain name (e.g. tunnels.example.com)"
            )


@dataclass(eq=False)
class TcpTunnel:
    port: int
    key: str
    owner: str
    server: asyncio.Server
    conn: SessionConnection | None
    visitors: set[StreamBridge] = field(default_factory=set)


@dataclass(eq=False)
class NamedRoute:
    """An HTTP name, a private service or an exit, held by one agent."""

    kind: str  # "http", "private" or "exit"
    name: str
    key: str
    owner: str
    conn: SessionConnection | None
    streams: int = 0

    @property
    def lease_key(self) -> tuple[str, str]:
        return _namespace(self.kind), self.name


def _namespace(kind: str) -> str:
    return "http" if kind == "http" else "svc"


class Relay:
    """A relay node; ``await start()`` binds, ``await close()`` stops everything."""

    def __init__(self, config: RelayConfig, *, on_event: EventSink | None = None) -> None:
        config.validate()
        self.config = config
        self.on_event = on_event
        self.fingerprint: str | None = None
        self.control_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.leases = LeaseTable(config.lease_grace)
        self.tunnels: dict[int, TcpTunnel] = {}
        self.names: dict[tuple[str, str], NamedRoute] = {}
        self.sessions: set[SessionConnection] = set()
        self.http: Any = None  # burrow.http.frontend.HttpFrontend, with --http-listen
        self._token_verifier: Any = None
        self._token_state_dir: Path | None = None
        self._deny_stamp: Any = None
        self._deny: frozenset[str] = frozenset()
        self._server: asyncio.Server | None = None
        self._admin: Any = None
        self._ssl: ssl.SSLContext | None = None
        self._expiry: dict[Any, asyncio.TimerHandle] = {}
        self._closing = False
        self._closed_bytes = [0, 0]
        self.metrics: Any = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        if not config.insecure:
            self._ssl = self._tls_context()
        self._load_tokens()
        try:
            self._server = await loop.create_server(
                self._new_session,
                config.listen_host,
                config.listen_port,
                ssl=self._ssl,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self._ssl else None,
                reuse_address=True,
            )
        except OSError as exc:
            raise _bind_error(config.listen_host, config.listen_port, exc, "control port") from None
        sockname = self._server.sockets[0].getsockname()
        self.control_address = (sockname[0], sockname[1])
        if config.admin is not None:
            await self._start_admin(config.admin)
        if config.http_listen is not None or config.https_listen is not None:
            await self._start_http()
        emit(
            self.on_event,
            "relay_ready",
            control=format_hostport(*self.control_address),
            fingerprint=self.fingerprint,
            tls=self._ssl is not None,
            **({"admin": format_hostport(*self.admin_address)} if self.admin_address else {}),
        )

    def _load_tokens(self) -> None:
        """Accept scoped tokens when ``burrow token issue`` made a key in the state dir."""
        from burrow.net.tls import default_state_dir

        state_dir = self.config.state_dir or default_state_dir("relay")
        if not (state_dir / "token.key").is_file():
            return
        from burrow.tokens import TokenKey, TokenVerifier

        key = TokenKey.load_or_create(state_dir)
        self._token_state_dir = state_dir

        def verify(claims: str, mac: str, transcript: bytes) -> Any:
            return TokenVerifier(key, self._denied()).verify(claims, mac, transcript, time.time())

        self._token_verifier = verify

    def _denied(self) -> frozenset[str]:
        """The token deny list, re-read when its file changes, so a revocation applies to the
        next handshake, registration and stream open, without a restart."""
        from burrow.tokens import load_deny

        state_dir = self._token_state_dir
        if state_dir is None:
            return frozenset()
        try:
            stamp: Any = (state_dir / "token.deny").stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp != self._deny_stamp:
            self._deny_stamp, self._deny = stamp, load_deny(state_dir)
        return self._deny

    def _scope_error(self, conn: SessionConnection, kind: str, name: str) -> str | None:
        """Why ``conn`` may not ``kind`` (expose/connect) ``name`` now, or None."""
        scope = conn.session.scope
        if scope is None:
            return None
        if scope.token_id is not None and scope.token_id in self._denied():
            return "token has been revoked"
        allowed = scope.may_expose(name) if kind == "expose" else scope.may_connect(name)
        return None if allowed else str(scope.missing(kind, name))

    async def _start_http(self) -> None:
        from burrow.http.frontend import HttpFrontend

        config = self.config
        self.http = HttpFrontend(
            config.domain,
            self._resolve_http,
            on_visitor=self._http_visitor,
            status=self._status,
            fallback=self._only_http_name if config.http_fallback else None,
        )
        for scheme, address in (("http", config.http_listen), ("https", config.https_listen)):
            if address is None:
                continue
            context = self._https_context() if scheme == "https" else None
            try:
                bound = await self.http.listen(scheme, address[0], address[1], ssl=context)
            except OSError as exc:
                raise _bind_error(address[0], address[1], exc, f"{scheme} port") from None
            emit(
                self.on_event,
                "http_ready",
                scheme=scheme,
                listen=format_hostport(*bound),
                example=self.http.url_for("NAME"),
            )

    def _https_context(self) -> ssl.SSLContext:
        from burrow.net import tls

        config = self.config
        if config.tls_cert is not None and config.tls_key is not None:
            cert, key = config.tls_cert, config.tls_key
        else:
            state_dir = (config.state_dir or tls.default_state_dir("relay")) / "https"
            names = (config.domain, f"*.{config.domain}", *config.hostnames)
            pair = tls.load_or_create_relay_cert(state_dir, names)
            cert, key = pair.cert_path, pair.key_path
        context = tls.server_context(cert, key)
        context.set_alpn_protocols(["http/1.1"])
        return context

    def _tls_context(self) -> ssl.SSLContext:
        from burrow.net import tls

        config = self.config
        if config.tls_cert is not None and config.tls_key is not None:
            cert, key = config.tls_cert, config.tls_key
            self.fingerprint = tls.fingerprint_of_pem_file(cert)
        else:
            state_dir = config.state_dir or tls.default_state_dir("relay")
            pair = tls.load_or_create_relay_cert(state_dir, config.hostnames)
            cert, key, self.fingerprint = pair.cert_path, pair.key_path, pair.fingerprint
        try:
            return tls.server_context(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the TLS certificate {cert} / key {key}: {exc}"
            ) from None

    async def _start_admin(self, address: tuple[str, int]) -> None:
        from burrow.net.admin import AdminServer, RelayMetrics

        self.metrics = RelayMetrics()
        self.metrics.on_collect = self._collect_bytes
        self._admin = AdminServer(self.metrics, self.health)
        try:
            self.admin_address = await self._admin.start(*address)
        except OSError as exc:
            raise _bind_error(address[0], address[1], exc, "admin port") from None

    def _collect_bytes(self) -> None:
        # "in" flows from visitors towards agents: what the relay writes into sessions.
        total_in = self._closed_bytes[0] + sum(c.bytes_out for c in self.sessions)
        total_out = self._closed_bytes[1] + sum(c.bytes_in for c in self.sessions)
        self.metrics.set_bytes(total_in, total_out)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "sessions": len(self.sessions),
            "tunnels": len(self.tunnels) + len(self.names),
            "streams": sum(len(t.visitors) for t in self.tunnels.values()),
            "names": sorted(f"{route.kind}:{route.name}" for route in self.names.values()),
        }

    async def close(self) -> None:
        self._closing = True
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        if self._server is not None:
            self._server.close()
        for tunnel in list(self.tunnels.values()):
            self._close_tunnel(tunnel)
        if self.http is not None:
            self.http.close()
        for conn in list(self.sessions):
            conn.close("relay shutting down")
        if self._admin is not None:
            await self._admin.close()
        if self._server is not None:
            try:
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            except TimeoutError:
                pass

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- sessions --------------------------------------------------------------------------

    def _new_session(self) -> SessionConnection:
        session = Session(
            Role.RELAY,
            secret=self.config.secret,
            heartbeat=self.config.heartbeat,
            token_verifier=self._token_verifier,
            allow_anonymous=self.config.secret is None and self._token_verifier is None,
        )
        conn = SessionConnection(
            session,
            on_stream=self._on_client_stream,
            on_control=self._on_control,
            on_handshake=self._on_handshake,
            on_closed=self._on_session_closed,
        )
        asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._handshake_deadline, conn)
        return conn

    def _handshake_deadline(self, conn: SessionConnection) -> None:
        if not conn.handshake_done.done() and conn.transport is not None:
            conn.close("no handshake within 10 s")

    def _on_handshake(self, conn: SessionConnection) -> None:
        self.sessions.add(conn)
        if self.metrics is not None:
            self.metrics.sessions.set(len(self.sessions))
        emit(self.on_event, "session_opened", peer=conn.peer, session=conn.session.session_id)

    def _on_session_closed(self, conn: SessionConnection, reason: str) -> None:
        if conn not in self.sessions:
            if conn.session.close_reason is not None:
                emit(self.on_event, "session_refused", peer=conn.peer, reason=reason)
                if self.metrics is not None:
                    self.metrics.errors.labels(kind="handshake").inc()
            return
        self.sessions.discard(conn)
        self._closed_bytes[0] += conn.bytes_out
        self._closed_bytes[1] += conn.bytes_in
        if self.metrics is not None:
            self.metrics.sessions.set(len(self.sessions))
            if "protocol error" in reason:
                self.metrics.errors.labels(kind="protocol").inc()
        emit(self.on_event, "session_closed", peer=conn.peer, reason=reason)
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for tunnel in list(self.tunnels.values()):
            if tunnel.conn is conn:
                tunnel.conn = None
                self.leases.release(tunnel.port, now)
                if self.config.lease_grace <= 0:
                    self._close_tunnel(tunnel)
                else:
                    self._expiry[tunnel.port] = loop.call_later(
                        self.config.lease_grace, self._expire, tunnel.port
                    )
        for route in list(self.names.values()):
            if route.conn is conn:
                route.conn = None
                self.leases.release(route.lease_key, now)
                if self.config.lease_grace <= 0:
                    self._drop_name(route)
                else:
                    self._expiry[route.lease_key] = loop.call_later(
                        self.config.lease_grace, self._expire_name, route.lease_key
                    )

    def _expire(self, port: int) -> None:
        self._expiry.pop(port, None)
        tunnel = self.tunnels.get(port)
        if tunnel is not None and tunnel.conn is None:
            self.leases.drop(port)
            self._close_tunnel(tunnel)
            emit(self.on_event, "lease_expired", port=port)

    def _expire_name(self, key: tuple[str, str]) -> None:
        self._expiry.pop(key, None)
        route = self.names.get(key)
        if route is not None and route.conn is None:
            self._drop_name(route)
            emit(self.on_event, "lease_expired", name=route.name, kind=route.kind)

    def _drop_name(self, route: NamedRoute) -> None:
        self.leases.drop(route.lease_key)
        if self.names.get(route.lease_key) is route:
            del self.names[route.lease_key]
            if self.metrics is not None:
                self.metrics.tunnels.labels(kind=route.kind).dec()
            emit(self.on_event, "tunnel_closed", kind=route.kind, name=route.name)

    # --- control ---------------------------------------------------------------------------

    def _on_control(self, conn: SessionConnection, message: dict[str, Any]) -> None:
        op = message.get("op")
        request_id = message.get("id")
        if op == "register":
            asyncio.get_running_loop().create_task(self._register(conn, request_id, message))
        elif op == "unregister":
            port = message.get("port")
            tunnel = self.tunnels.get(port) if isinstance(port, int) else None
            if tunnel is not None and tunnel.conn is conn:
                self.leases.drop(tunnel.port)
                self._close_tunnel(tunnel)
        else:
            conn.send_control(
                {
                    "op": "error",
                    "id": request_id,
                    "code": "unknown_op",
                    "message": f"unknown op {op!r}",
                }
            )

    async def _register(
        self, conn: SessionConnection, request_id: Any, message: dict[str, Any]
    ) -> None:
        try:
            kind = message.get("kind")
            key = str(message.get("key") or "")[:256]
            if kind in ("http", "private", "exit"):
                route = self._register_name(conn, str(kind), key, message)
                reply: dict[str, Any] = {"op": "registered", "id": request_id, "name": route.name}
                if kind == "http":
                    reply["url"] = self.http.url_for(route.name)
                conn.send_control(reply)
                emit(self.on_event, "tunnel_opened", kind=kind, name=route.name, peer=conn.peer)
                return
            if kind != "tcp":
                raise TunnelError(f"tunnel kind {kind!r} is not served by this relay", "bad_kind")
            self._check_expose(conn, key)
            want = message.get("port")
            if want is not None and (not isinstance(want, int) or not 0 <= want <= 65535):
                raise TunnelError(f"invalid port {want!r}", "bad_port")
            tunnel = await self._open_tcp(conn, key, want or None, bool(message.get("exact", True)))
        except TunnelError as exc:
            if self.metrics is not None:
                self.metrics.errors.labels(kind=exc.code).inc()
            emit(self.on_event, "tunnel_refused", peer=conn.peer, code=exc.code, message=str(exc))
            conn.send_control(
                {"op": "error", "id": request_id, "code": exc.code, "message": str(exc)}
            )
            return
        conn.send_control(
            {
                "op": "registered",
                "id": request_id,
                "port": tunnel.port,
                "host": self.config.public_host,
            }
        )
        if self.metrics is not None:
            self.metrics.tunnels.labels(kind="tcp").set(len(self.tunnels))
        emit(self.on_event, "tunnel_opened", kind="tcp", port=tunnel.port, peer=conn.peer)

    def _check_expose(self, conn: SessionConnection, name: str) -> None:
        problem = self._scope_error(conn, "expose", name)
        if problem is not None:
            raise TunnelError(problem, "not_allowed")

    def _register_name(
        self, conn: SessionConnection, kind: str, key: str, message: dict[str, Any]
    ) -> NamedRoute:
        """Give ``conn`` the name it asks for (or a new readable one), held by lease."""
        if kind == "http" and self.http is None:
            raise TunnelError(
                "this relay serves no HTTP tunnels; start it with --http-listen", "bad_kind"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        owner = self._owner(conn)
        wanted = message.get("name")
        exact = bool(message.get("exact", True))
        if wanted is not None:
            if not isinstance(wanted, str) or not NAME_PATTERN.fullmatch(wanted):
                raise TunnelError(
                    f"invalid name {str(wanted)[:80]!r}: use lowercase letters, digits and "
                    "hyphens (a DNS label, at most 63 characters)",
                    "bad_name",
                )
            self._check_expose(conn, wanted)
            try:
                return self._claim_name(conn, kind, wanted, key, owner, now)
            except TunnelError:
                if exact:
                    raise
        for _ in range(50):
            name = readable_name()
            if (_namespace(kind), name) not in self.names:
                self._check_expose(conn, name)
                return self._claim_name(conn, kind, name, key, owner, now)
        raise TunnelError("could not find a free name; pass one with --name", "no_free_name")

    def _claim_name(
        self, conn: SessionConnection, kind: str, name: str, key: str, owner: str, now: float
    ) -> NamedRoute:
        lease_key = (_namespace(kind), name)
        self.leases.check_free(lease_key, owner, now)
        route = self.names.get(lease_key)
        if route is not None and route.kind != kind:
            raise TunnelError(f"name {name!r} is in use by a {route.kind} service", "name_in_use")
        handle = self._expiry.pop(lease_key, None)
        if handle is not None:
            handle.cancel()
        if route is None:
            route = NamedRoute(kind=kind, name=name, key=key, owner=owner, conn=conn)
            self.names[lease_key] = route
            if self.metrics is not None:
                self.metrics.tunnels.labels(kind=kind).inc()
        else:
            previous = route.conn
            if previous is not None and previous is not conn and previous.is_open:
                previous.send_control({"op": "tunnel_moved", "key": route.key})
            route.conn, route.owner, route.key = conn, owner, key
        self.leases.take(lease_key, owner, key)
        return route

    # --- HTTP and connectors ----------------------------------------------------------------

    def _resolve_http(self, name: str) -> Any:
        from burrow.http.frontend import Route

        route = self.names.get(("http", name))
        return None if route is None else Route(name, route.conn)

    def _only_http_name(self) -> str | None:
        names = [route.name for route in self.names.values() if route.kind == "http"]
        return names[0] if len(names) == 1 else None

    def _http_visitor(self, bridge: StreamBridge) -> None:
        if self.metrics is not None:
            self.metrics.streams.inc()
            self.metrics.streams_total.inc()

    def _status(self, name: str) -> dict[str, Any] | None:
        route = self.names.get(("http", name))
        if route is None:
            return None
        online = route.conn is not None and route.conn.is_open
        return {"name": name, "online": online, "connected_sockets": 1 if online else 0}

    def _on_client_stream(
        self, conn: SessionConnection, stream_id: int, info: dict[str, Any]
    ) -> None:
        """A connector opens a stream to a private service or an exit: check, route, join."""
        from burrow.net.join import JoinHalf, join

        session = conn.session
        name = info.get("service")
        if not isinstance(name, str) or not name:
            session.reset_stream(stream_id, "not_allowed", "streams must name a service")
            return
        problem = self._scope_error(conn, "connect", name)
        if problem is not None:
            session.reset_stream(stream_id, "not_allowed", problem)
            emit(self.on_event, "stream_refused", peer=conn.peer, service=name, reason="scope")
            return
        route = self.names.get(("svc", name[:64]))
        if route is None:
            session.reset_stream(stream_id, "no_such_tunnel", f"no service named {name!r}")
            return
        target = route.conn
        if target is None or not target.is_open:
            session.reset_stream(
                stream_id, "unreachable", f"service {name!r} is offline (its agent is away)"
            )
            return
        forward: dict[str, Any] = {"service": name, "src": info.get("src") or _peer_list(conn)}
        if route.kind == "exit":
            forward["target"] = info.get("target")
        elif "target" in info:
            session.reset_stream(stream_id, "not_allowed", f"{name!r} is not an exit")
            return
        near = JoinHalf(conn, stream_id)
        far = JoinHalf(target, target.session.open_stream(forward))
        join(near, far)
        target.flush()
        route.streams += 1

    def _owner(self, conn: SessionConnection) -> str:
        return conn.session.peer_identity or f"session:{conn.session.session_id}"

    async def _open_tcp(
        self, conn: SessionConnection, key: str, want: int | None, exact: bool
    ) -> TcpTunnel:
        config = self.config
        loop = asyncio.get_running_loop()
        now = loop.time()
        owner = self._owner(conn)
        # The same agent coming back for the same tunnel gets its port, whatever it asked for.
        lease = self.leases.find(owner, key, now) if key else None
        if (
            lease is not None
            and lease.port in self.tunnels
            and (want is None or want == lease.port)
        ):
            return self._reattach(self.tunnels[lease.port], conn)
        if want is not None and not config.min_port <= want <= config.max_port:
            if exact:
                span = f"{config.min_port}-{config.max_port}"
                raise TunnelError(
                    f"port {want} is outside the relay's range {span}", "port_out_of_range"
                )
            want = None
        if want is not None:
            try:
                self.leases.check_free(want, owner, now)
                existing = self.tunnels.get(want)
                if existing is not None:
                    return self._reattach(existing, conn, key)
                return await self._bind(conn, want, key, owner)
            except TunnelError:
                if exact:
                    raise
        for _ in range(RANDOM_PORT_TRIES):
            port = random.randint(config.min_port, config.max_port)
            if port in self.tunnels or self.leases.get(port) is not None:
                continue
            try:
                return await self._bind(conn, port, key, owner)
            except TunnelError:
                continue
        raise TunnelError(
            f"no free port in the relay's range {config.min_port}-{config.max_port}", "no_free_port"
        )

    def _reattach(
        self, tunnel: TcpTunnel, conn: SessionConnection, key: str | None = None
    ) -> TcpTunnel:
        handle = self._expiry.pop(tunnel.port, None)
        if handle is not None:
            handle.cancel()
        previous = tunnel.conn
        if previous is not None and previous is not conn and previous.is_open:
            previous.send_control({"op": "tunnel_moved", "key": tunnel.key, "port": tunnel.port})
        tunnel.conn = conn
        if key is not None:
            tunnel.key = key
        self.leases.take(tunnel.port, self._owner(conn), tunnel.key)
        return tunnel

    async def _bind(self, conn: SessionConnection, port: int, key: str, owner: str) -> TcpTunnel:
        host = self.config.bind_tunnels or self.config.listen_host
        loop = asyncio.get_running_loop()
        tunnel: TcpTunnel | None = None

        def factory() -> asyncio.Protocol:
            assert tunnel is not None
            return self._new_visitor(tunnel)

        try:
            server = await loop.create_server(factory, host, port, reuse_address=True, backlog=1024)
        except OSError as exc:
            raise _bind_error(host, port, exc, "public port", tunnel_error=True) from None
        tunnel = TcpTunnel(port=port, key=key, owner=owner, server=server, conn=conn)
        self.tunnels[port] = tunnel
        self.leases.take(port, owner, key)
        return tunnel

    def _close_tunnel(self, tunnel: TcpTunnel) -> None:
        self.tunnels.pop(tunnel.port, None)
        tunnel.server.close()
        for visitor in list(tunnel.visitors):
            visitor.close()
        if self.metrics is not None:
            self.metrics.tunnels.labels(kind="tcp").set(len(self.tunnels))
        emit(self.on_event, "tunnel_closed", kind="tcp", port=tunnel.port)

    # --- visitors --------------------------------------------------------------------------

    def _new_visitor(self, tunnel: TcpTunnel) -> asyncio.Protocol:
        conn = tunnel.conn
        if conn is None or not conn.is_open:
            return _Refuser()
        bridge = StreamBridge(conn, on_done=lambda b: self._visitor_done(tunnel, b))
        return _VisitorOpener(bridge, tunnel, self)

    def _visitor_done(self, tunnel: TcpTunnel, bridge: StreamBridge) -> None:
        tunnel.visitors.discard(bridge)
        if self.metrics is not None:
            self.metrics.streams.dec()


class _VisitorOpener(asyncio.Protocol):
    """Opens the stream when the visitor's connection is made, then hands over to the bridge."""

    def __init__(self, bridge: StreamBridge, tunnel: TcpTunnel, relay: Relay) -> None:
        self.bridge = bridge
        self.tunnel = tunnel
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        bridge = self.bridge
        conn = bridge.conn
        if not conn.is_open:
            transport.close()
            return
        info = visitor_info(transport, port=self.tunnel.port)
        bridge.attach(conn.session.open_stream(info))
        conn.flush()
        self.tunnel.visitors.add(bridge)
        metrics = self.relay.metrics
        if metrics is not None:
            metrics.streams.inc()
            metrics.streams_total.inc()
        # From here on the transport talks to the bridge directly.
        transport.set_protocol(bridge)
        bridge.connection_made(transport)


class _Refuser(asyncio.Protocol):
    """A visitor of a tunnel whose agent is away: closed at once, cleanly."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _bind_error(
    host: str, port: int, exc: OSError, what: str, *, tunnel_error: bool = False
) -> Exception:
    address = format_hostport(host, port)
    if exc.errno == errno.EADDRINUSE:
        message = f"cannot listen on {address} ({what}): the port is already in use"
        code = "port_in_use"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        message = f"cannot listen on {address} ({what}): permission denied"
        code = "permission_denied"
    elif isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        message = f"cannot listen on {address} ({what}): no such local address"
        code = "bad_address"
    else:
        message = f"cannot listen on {address} ({what}): {exc.strerror or exc}"
        code = "bind_failed"
    return TunnelError(message, code) if tunnel_error else ConfigError(message)


_ADJECTIVES = [
    "amber",
    "azure",
    "bold",
    "brave",
    "brisk",
    "calm",
    "clever",
    "cosmic",
    "crisp",
    "dapper",
    "eager",
    "fancy",
    "gentle",
    "glad",
    "golden",
    "happy",
    "jolly",
    "keen",
    "lively",
    "lucky",
    "merry",
    "mighty",
    "misty",
    "nimble",
    "noble",
    "proud",
    "quick",
    "quiet",
    "rapid",
    "rosy",
    "shiny",
    "silver",
    "sleek",
    "snowy",
    "solar",
    "sunny",
    "swift",
    "tidy",
    "vivid",
    "warm",
    "wise",
    "witty",
    "zesty",
]
_NOUNS = [
    "badger",
    "beaver",
    "bison",
    "camel",
    "crane",
    "dingo",
    "eagle",
    "falcon",
    "ferret",
    "finch",
    "fox",
    "gecko",
    "heron",
    "ibis",
    "koala",
    "lemur",
    "lynx",
    "marmot",
    "moose",
    "newt",
    "otter",
    "owl",
    "panda",
    "puffin",
    "quail",
    "rabbit",
    "raven",
    "robin",
    "seal",
    "shrew",
    "sloth",
    "stoat",
    "swan",
    "tapir",
    "tiger",
    "toad",
    "walrus",
    "weasel",
    "wombat",
    "yak",
    "zebra",
]


def readable_name() -> str:
    """A random name people can read aloud: ``swift-otter-4821``."""
    rng = random.SystemRandom()
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}-{rng.randrange(1000, 10000)}"


def _peer_list(conn: SessionConnection) -> list[Any] | None:
    transport = conn.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return [peer[0], peer[1]] if isinstance(peer, tuple) else None
