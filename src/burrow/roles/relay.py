"""The relay: the rendezvous agents dial out to. It serves the control port (TLS unless told
otherwise), keeps one session per agent, opens a public TCP port per TCP tunnel, and joins
connectors' streams to the agents offering private services and exits.

Who holds which port or name lives in a ``Registry`` (``burrow.roles.registry``); the relay
keeps only what a process must (its sessions, its listening sockets). Faces that speak a
protocol on top, such as the HTTP frontend, are injected as ``Frontend`` objects by whoever
builds the relay, so this module knows nothing of HTTP.

With a registry shared by several nodes (``SharedRegistry``) the relay is one node of a
cluster: it listens on every public port any node holds, and a visitor (or a connector's
stream) for a lease held on another node goes over this node's link to it
(``burrow.roles.cluster``), where it is joined to the agent's stream. A stream that arrives
on a link is served only from this node's own sessions, never sent on again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from burrow.addresses import DEFAULT_RELAY_PORT, is_loopback
from burrow.errors import BurrowError, ConfigError, TunnelError
from burrow.events import EventSink, emit, format_hostport
from burrow.net.bridge import StreamBridge, visitor_info
from burrow.net.connection import SessionConnection, new_session
from burrow.net.gate import ControlListener, Slot
from burrow.roles.leases import Lease
from burrow.roles.limits import Counts, Limits, Quiet, Refused, TokenBucket
from burrow.roles.names import NAME_PATTERN, readable_name
from burrow.roles.registry import (
    Holder,
    LeaseKey,
    MemoryRegistry,
    NodeInfo,
    Registry,
    SharedRegistry,
)
from burrow.wire.messages import (
    Closed,
    ErrorReply,
    MessageError,
    OpenInfo,
    Register,
    Registered,
    TunnelMoved,
    Unregister,
    parse_control,
    parse_open,
    quote,
    to_message,
)
from burrow.wire.session import Role, WindowPool

log = logging.getLogger("burrow.relay")

DEFAULT_CONTROL_PORT = DEFAULT_RELAY_PORT
HANDSHAKE_TIMEOUT = 10.0
#: How many random ports to try before giving up (bore's figure: ~99.999% success at 15% free).
RANDOM_PORT_TRIES = 150
#: Named kinds the relay serves itself, and their namespace: connectors name both alike.
SERVICE_KINDS: Mapping[str, str] = {"private": "svc", "exit": "svc"}
_DOMAIN_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"


@dataclass
class RelayConfig:
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_CONTROL_PORT
    secret: str | None = None
    min_port: int = 20000
    max_port: int = 30000
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
    # The HTTP frontend's settings (used by whoever builds it: ``burrow.node``).
    http_listen: tuple[str, int] | None = None
    https_listen: tuple[str, int] | None = None
    domain: str = "localhost"
    #: Route requests for any other Host (127.0.0.1:PORT) to the one HTTP tunnel, if only one:
    #: for embedded relays, whose clients may not resolve NAME.localhost.
    http_fallback: bool = False
    #: This node's name in a registry shared with other nodes.
    node_id: str = ""
    #: HOST:PORT other nodes dial to reach this one (default: the control listener's).
    advertise: str | None = None
    #: Let in clients with neither the secret nor a token. Off by default; a loopback relay
    #: with no secret and no token key lets them in anyway (nobody else can reach it).
    allow_anonymous: bool = False
    #: What one client may take of this relay (registrations, streams, buffers, handshakes).
    limits: Limits = field(default_factory=Limits)
    #: Show private services' and exits' names on the admin endpoint (HTTP names are public).
    admin_names: bool = False

    def validate(self) -> None:
        import re

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
        self.limits.check()

        domain = rf"(?=.{{1,253}}$){_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*"
        if not re.fullmatch(domain, self.domain):
            raise ConfigError(
                f"--domain {self.domain!r} is not a domain name (e.g. tunnels.example.com)"
            )


@dataclass
class Route:
    """Where a name goes: an open session (the agent's, or this node's link to the node that
    holds the agent: a stream opened on either reaches the agent), or ``None`` while its
    agent is reconnecting."""

    name: str
    conn: SessionConnection | None


class Frontend(Protocol):
    """A public face plugged into the relay (the HTTP listener): it serves names of its
    ``kinds`` (kind -> namespace) and reaches their agents through ``Relay.route``."""

    kinds: Mapping[str, str]

    async def start(self, relay: Relay) -> None: ...

    def describe(self, kind: str, name: str) -> dict[str, Any]:
        """Fields for the agent's ``registered`` reply (the public URL)."""
        ...

    def close(self) -> None: ...


@dataclass(eq=False)
class PortListener:
    """A public TCP port this node listens on, for the agent that holds its lease."""

    port: int
    relay: Relay
    server: asyncio.Server | None = None
    visitors: set[StreamBridge] = field(default_factory=set)

    @property
    def lease(self) -> Lease | None:
        return self.relay.registry.resolve(self.port)

    @property
    def conn(self) -> SessionConnection | None:
        """Where a visitor's stream goes: the agent's session, or the link to its node."""
        return self.relay.target(self.lease)

    @property
    def key(self) -> str:
        lease = self.lease
        return lease.key if lease is not None else ""


@dataclass(frozen=True)
class NamedRoute:
    """How ``Relay.names`` shows a held name (a view of the registry)."""

    kind: str
    name: str
    key: str
    owner: str
    conn: SessionConnection | None


class Relay:
    """A relay node; ``await start()`` binds, ``await close()`` stops everything."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        on_event: EventSink | None = None,
        registry: Registry | None = None,
        frontends: tuple[Frontend, ...] = (),
    ) -> None:
        config.validate()
        self.config = config
        self.on_event = on_event
        self.registry: Registry = (
            registry if registry is not None else MemoryRegistry(config.lease_grace)
        )
        #: The registry when it is shared with other nodes (a cluster), else None.
        self.shared = registry if isinstance(registry, SharedRegistry) else None
        self.links: Any = None  # burrow.roles.cluster.NodeLinks, in a cluster
        self.frontends = frontends
        self.fingerprint: str | None = None
        self.control_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.tunnels: dict[int, PortListener] = {}  # public ports listened on by this node
        self.sessions: set[SessionConnection] = set()
        self._by_session: dict[str, SessionConnection] = {}
        self._namespaces: dict[str, str] = dict(SERVICE_KINDS)
        self._served_by: dict[str, Frontend] = {}
        for frontend in frontends:
            self._namespaces.update(frontend.kinds)
            self._served_by.update(dict.fromkeys(frontend.kinds, frontend))
        self._token_verifier: Any = None
        self._token_state_dir: Path | None = None
        self._deny_stamp: Any = None
        self._deny_path: str | None = None
        #: The loop time of the last look at the deny file: one stat per turn of the loop
        #: (uvloop's clock moves once per turn), not one per check of a stream open.
        self._deny_looked: float | None = None
        self._deny_merged: tuple[frozenset[str], frozenset[str]] | None = None
        self._deny: frozenset[str] = frozenset()
        self._server: ControlListener | None = None
        self._slots: dict[SessionConnection, Slot] = {}
        self._admin: Any = None
        self._ssl: ssl.SSLContext | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._closed_bytes = [0, 0]
        self.metrics: Any = None
        limits = config.limits
        self._buffers = WindowPool(limits.buffer_total)  # every session's windows together
        self._buckets: dict[SessionConnection, TokenBucket] = {}
        self._visitors = Counts(limits.streams_per_service)  # open streams by lease key
        self._quiet = Quiet()

    # --- views -------------------------------------------------------------------------------

    @property
    def leases(self) -> Registry:
        return self.registry

    @property
    def names(self) -> dict[tuple[str, str], NamedRoute]:
        """Every name held (or waiting for its agent), by (namespace, name)."""
        routes: dict[tuple[str, str], NamedRoute] = {}
        for lease in self.registry.leases():
            if isinstance(lease.port, tuple):
                namespace, name = lease.port
                routes[(namespace, name)] = NamedRoute(
                    lease.kind, name, lease.key, lease.owner, self.session_for(lease)
                )
        return routes

    def session_for(self, lease: Lease | None) -> SessionConnection | None:
        """The open session holding ``lease`` on this node, if any."""
        if lease is None or not lease.connected:
            return None
        conn = self._by_session.get(lease.session)
        return conn if conn is not None and conn.is_open else None

    def target(self, lease: Lease | None) -> SessionConnection | None:
        """Where a stream for ``lease`` is opened: its session on this node, or the link to
        the node holding it; None while its agent is away (or the link is down)."""
        if lease is None or not lease.connected:
            return None
        if self.links is None or lease.node == self.config.node_id:
            return self.session_for(lease)
        conn: SessionConnection | None = self.links.conn(lease.node)
        return conn

    def route(self, kind: str, name: str) -> Route | None:
        """Where a visitor of ``name`` (a name of ``kind``) goes; None if nobody holds it
        (or its holder's token was revoked: the name is closed now)."""
        namespace = self._namespaces.get(kind)
        lease = self.registry.resolve((namespace, name)) if namespace else None
        if lease is None or lease.kind != kind or self._revoked(lease):
            return None
        return Route(name, self.target(lease))

    def held_names(self, kind: str) -> list[str]:
        return [lease.port[1] for lease in self.registry.leases() if lease.kind == kind]  # type: ignore[index]

    def open_visitor(self, key: LeaseKey) -> str | None:
        """Admit one more stream to the tunnel ``key``; the refusal's text if it is full."""
        if self._visitors.full(key):
            limit = self.config.limits.streams_per_service
            self._limited(
                Refused(
                    "streams_per_service",
                    f"tunnel {_show_key(key)} has {limit} open connections already "
                    "(--max-streams-per-service)",
                )
            )
            return "this tunnel has too many open connections; try again later"
        self._visitors.add(key)
        if self.metrics is not None:
            self.metrics.stream_opened()
        return None

    def close_visitor(self, key: LeaseKey) -> None:
        self._visitors.remove(key)
        if self.metrics is not None:
            self.metrics.stream_closed()

    def _limited(self, refusal: Refused) -> None:
        """Count a refusal by its kind and log it, at most once per kind every few seconds."""
        self._count_error(f"limit_{refusal.kind}")
        now = asyncio.get_running_loop().time()
        if self._quiet.due(refusal.kind, now):
            more = self._quiet.take_suppressed(refusal.kind)
            suffix = f" (and {more} more since the last report)" if more else ""
            emit(self.on_event, "limited", kind=refusal.kind, message=f"{refusal}{suffix}")

    def _revoked(self, lease: Lease) -> bool:
        """Whether ``lease``'s holder proved a token that has since been revoked; if so, its
        tunnel is closed and its agent told (revocation reaches visitors, not only holders)."""
        if lease.token is None or lease.token not in self._denied():
            return False
        self._spawn(self._revoke(lease))
        return True

    async def _revoke(self, lease: Lease) -> None:
        dropped = await self.registry.drop(lease.port, lease.session)
        if dropped is None:
            return
        self._lease_gone(dropped, expired=False)
        holder = self._by_session.get(lease.session)
        if holder is not None and holder.is_open:
            notice = Closed(key=lease.key, code="revoked", message="its token has been revoked")
            holder.send_control(to_message(notice))

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        if not config.insecure:
            self._ssl = self._tls_context()
        self._load_tokens()
        limits = config.limits
        self._server = ControlListener(
            self._new_session,
            ssl_context=self._ssl,
            deadline=HANDSHAKE_TIMEOUT,
            total=limits.unauthenticated,
            per_source=limits.unauthenticated_per_source,
            on_refused=self._gate_refused,
        )
        try:
            self.control_address = await self._server.listen(config.listen_host, config.listen_port)
        except OSError as exc:
            raise bind_error(config.listen_host, config.listen_port, exc, "control port") from None
        if config.admin is not None:
            await self._start_admin(config.admin)
        for frontend in self.frontends:
            await frontend.start(self)
        if self.shared is not None:
            await self._join_cluster(self.shared)
        emit(
            self.on_event,
            "relay_ready",
            control=format_hostport(*self.control_address),
            fingerprint=self.fingerprint,
            tls=self._ssl is not None,
            **({"admin": format_hostport(*self.admin_address)} if self.admin_address else {}),
        )

    async def _join_cluster(self, shared: SharedRegistry) -> None:
        """Open the shared registry with this node's record; links to peers follow it."""
        from burrow.roles.cluster import NodeLinks
        from burrow.version import __version__

        config = self.config
        if self._token_key() is None:
            state_dir = self._token_state_dir
            raise ConfigError(
                "a cluster node needs the cluster's token key (nodes authenticate to each other "
                f"with it): create it once with `burrow token init --state-dir {state_dir}` and "
                "copy token.key into every node's --state-dir"
            )
        assert self.control_address is not None
        advertise = config.advertise
        if advertise is None:
            host, port = self.control_address
            if host in ("0.0.0.0", "::", ""):
                raise ConfigError(
                    "a cluster node listening on every address needs --advertise HOST:PORT: "
                    "the address the other nodes dial"
                )
            advertise = format_hostport(host, port)
        self.links = NodeLinks(config.node_id, token_key=self._token_key, on_event=self.on_event)
        instance = random.randbytes(6).hex()
        node = NodeInfo(
            id=config.node_id,
            address=advertise,
            fingerprint=self.fingerprint,
            started=time.time(),
            version=__version__,
            instance=instance,
        )
        await shared.open(node, self)
        emit(
            self.on_event,
            "cluster_joined",
            node=config.node_id,
            advertise=advertise,
            nodes=sorted(shared.nodes()),
            leases=len(shared.leases()),
        )

    # --- what a shared registry tells this node ------------------------------------------------

    def lease_changed(self, key: LeaseKey, old: Lease | None, new: Lease | None) -> None:
        """Another node (or time) changed ``key``: listen on a port any node holds, stop
        when it is gone, and tell a session of this node that lost its tunnel elsewhere."""
        me = self.config.node_id
        if isinstance(key, int):
            if new is not None and key not in self.tunnels and not self._closing:
                self._spawn(self._listen_for_peer(key))
            elif new is None and old is not None and old.node != me:
                listener = self.tunnels.get(key)
                if listener is not None:
                    self._stop_listening(listener)
        if old is None or old.node != me:
            return
        if new is None:
            self._lease_gone(old, expired=not old.connected)
            return
        conn = self._by_session.get(old.session)
        if new.session != old.session and conn is not None and conn.is_open:
            moved = TunnelMoved(key=old.key, port=key if isinstance(key, int) else None)
            conn.send_control(to_message(moved))
        self._count_tunnels()

    def lease_lost(self, lease: Lease) -> None:
        """A lease of a session here was taken while the registry was away: close it."""
        emit(
            self.on_event,
            "warning",
            message=f"lost {_show_key(lease.port)} while the registry was unreachable: "
            "another agent holds it now",
        )
        conn = self._by_session.get(lease.session)
        if conn is not None and conn.is_open:
            notice = Closed(
                key=lease.key,
                code="lost",
                message="another agent took it while the relay's registry was unreachable",
            )
            conn.send_control(to_message(notice))
        self._count_tunnels()

    def nodes_changed(self, nodes: Mapping[str, NodeInfo]) -> None:
        if self.links is not None and not self._closing:
            self.links.update(nodes)

    def registry_state(self, available: bool, reason: str) -> None:
        if available:
            emit(self.on_event, "registry_available", node=self.config.node_id)
        else:
            emit(self.on_event, "registry_unavailable", node=self.config.node_id, reason=reason)

    def node_load(self) -> tuple[int, int, int]:
        """Sessions of agents and connectors, tunnels held here, streams open here."""
        me = self.config.node_id
        clients = [conn for conn in self.sessions if not _is_node(conn)]
        tunnels = sum(1 for lease in self.registry.leases() if lease.node == me and lease.connected)
        streams = sum(conn.session.open_streams for conn in clients)
        return len(clients), tunnels, streams

    async def _listen_for_peer(self, port: int) -> None:
        """Listen on a port another node's agent holds, so visitors may come in here too."""
        if port in self.tunnels:
            return
        try:
            listener = await self._listen(port)
        except TunnelError as exc:
            lease = self.registry.resolve(port)
            holder = lease.node if lease is not None else "another node"
            emit(
                self.on_event,
                "warning",
                message=f"cannot serve port {port} of a tunnel on node {holder} here: {exc}",
            )
            return
        lease = self.registry.resolve(port)
        if lease is None or self._closing:
            self._stop_listening(listener)
            return
        emit(self.on_event, "peer_port_open", port=port, node=lease.node)

    def _stop_listening(self, listener: PortListener) -> None:
        """Stop taking visitors on a port; those already in finish (their streams end with
        the tunnel on the node that holds it)."""
        if self.tunnels.get(listener.port) is listener:
            del self.tunnels[listener.port]
        if listener.server is not None:
            listener.server.close()

    def _load_tokens(self) -> None:
        """Tokens signed with the key in the state directory are accepted from the moment the
        key exists (``burrow token init``), without a restart; a key that changes (rotation)
        is read again. A relay others can reach with no secret requires tokens: it makes its
        key now if there is none, and says how to mint them."""
        from burrow.net.tls import default_state_dir

        config = self.config
        self._token_state_dir = state_dir = config.state_dir or default_state_dir("relay")
        self._deny_path = self._deny_looked = None
        self._key_stamp: Any = None
        self._key: Any = None
        if config.allow_anonymous:
            emit(
                self.on_event,
                "warning",
                message="--allow-anonymous: anyone who reaches this relay may open tunnels on it",
            )
        elif config.secret is None and not is_loopback(config.listen_host):
            from burrow.tokens import TokenKey

            _, created = TokenKey.create(state_dir)
            emit(
                self.on_event,
                "tokens_required",
                key=str(state_dir / "token.key"),
                created=created,
                hint=f"agents need a token: burrow token issue --state-dir {state_dir} ...",
            )

        def verify(claims: str, mac: str, transcript: bytes) -> Any:
            from burrow.tokens import TokenError, TokenVerifier

            try:
                key = self._token_key()
            except BurrowError as exc:
                log.error("cannot use the token key: %s", exc)
                raise TokenError(
                    "this relay cannot read its token key; tell its operator"
                ) from None
            if key is None:
                raise TokenError(
                    "this relay has no token key yet; use its --secret, or mint tokens on the "
                    "relay's machine (`burrow token init`, then `burrow token issue`)",
                    "no_key",
                )
            return TokenVerifier(key, self._denied()).verify(claims, mac, transcript, time.time())

        self._token_verifier = verify

    def _token_key(self) -> Any:
        """The token key as the state directory holds it now (None if there is none)."""
        from burrow.tokens import KEY_FILE, TokenKey

        assert self._token_state_dir is not None
        try:
            stamp: Any = (self._token_state_dir / KEY_FILE).stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp != self._key_stamp:
            self._key_stamp = stamp
            self._key = TokenKey.load(self._token_state_dir) if stamp is not None else None
        return self._key

    def _anonymous_allowed(self) -> bool:
        config = self.config
        if config.allow_anonymous:
            return True
        if config.secret is not None or not is_loopback(config.listen_host):
            return False
        try:
            return self._token_key() is None
        except BurrowError:
            return False

    def _denied(self) -> frozenset[str]:
        """The token deny list, re-read when its file changes, so a revocation applies to the
        next handshake, registration and stream open, without a restart; in a cluster, with
        the ids revoked in the shared registry."""
        from burrow.tokens import DENY_FILE, load_deny

        state_dir = self._token_state_dir
        if state_dir is None:
            return frozenset() if self.shared is None else self.shared.denied
        if self._deny_path is None:  # a str, so the stat at every stream open costs no pathlib
            self._deny_path = os.path.join(state_dir, DENY_FILE)
        now = asyncio.get_running_loop().time()
        stamp: Any = self._deny_stamp
        if now != self._deny_looked:
            self._deny_looked = now
            try:
                stamp = os.stat(self._deny_path).st_mtime_ns
            except OSError:
                stamp = None
        shared = self.shared
        if stamp != self._deny_stamp:
            self._deny_stamp, self._deny = stamp, load_deny(state_dir)
            self._deny_merged = None
        if shared is None or not shared.denied:
            return self._deny
        merged = self._deny_merged
        if merged is None or merged[0] is not shared.denied:  # the cluster's list changed
            merged = self._deny_merged = (shared.denied, self._deny | shared.denied)
        return merged[1]

    def _scope_error(self, conn: SessionConnection, kind: str, name: str) -> str | None:
        """Why ``conn`` may not ``kind`` (expose/connect) ``name`` now, or None."""
        scope = conn.session.scope
        if scope is None:
            return None
        if scope.token_id is not None and scope.token_id in self._denied():
            return "token has been revoked"
        allowed = scope.may_expose(name) if kind == "expose" else scope.may_connect(name)
        return None if allowed else str(scope.missing(kind, name))

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
        self.metrics.on_collect = self._collect
        names = {*self.config.hostnames, self.config.public_host or "", self.config.domain}
        self._admin = AdminServer(self.metrics, self.health, frozenset(n for n in names if n))
        try:
            self.admin_address = await self._admin.start(*address)
        except OSError as exc:
            raise bind_error(address[0], address[1], exc, "admin port") from None

    def _collect(self) -> None:
        # "in" flows from visitors towards agents: what the relay writes into sessions.
        total_in = self._closed_bytes[0] + sum(c.bytes_out for c in self.sessions)
        total_out = self._closed_bytes[1] + sum(c.bytes_in for c in self.sessions)
        self.metrics.set_bytes(total_in, total_out)
        if self.shared is not None:
            links = self.links.state() if self.links is not None else {}
            self.metrics.set_cluster(self.shared.available, links)

    def _count_tunnels(self) -> None:
        if self.metrics is None:
            return
        counts: dict[str, int] = {}
        for lease in self.registry.leases():
            if lease.node == self.config.node_id:  # this node's (all, with one node)
                counts[lease.kind] = counts.get(lease.kind, 0) + 1
        shown = {kind for kind, _value in self.metrics.tunnels.items()}
        for kind in shown | counts.keys():
            self.metrics.tunnels.labels(kind=kind).set(counts.get(kind, 0))

    def _count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.error(kind)

    def health(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "status": "ok",
            "sessions": len(self.sessions),
            "unauthenticated": self._server.pending if self._server is not None else 0,
            "tunnels": len(self.registry.leases()),
            "streams": sum(len(t.visitors) for t in self.tunnels.values()),
            "names": sorted(
                f"{route.kind}:{route.name}"
                for route in self.names.values()
                if self.config.admin_names or route.kind == "http"
            ),
        }
        shared = self.shared
        if shared is not None:
            tunnels = self.node_load()[1]
            report["cluster"] = {
                "node": self.config.node_id,
                "registry": "ok" if shared.available else "unavailable",
                "nodes": sorted(shared.nodes()),
                "links": self.links.state() if self.links is not None else {},
                "held_here": tunnels,
            }
            if not shared.available:
                report["status"] = "degraded"
        return report

    async def close(self) -> None:
        self._closing = True
        if self._sweep is not None:
            self._sweep.cancel()
        if self._server is not None:
            self._server.close()
        for tunnel in list(self.tunnels.values()):
            self._close_listener(tunnel)
        for frontend in self.frontends:
            frontend.close()
        if self.links is not None:
            await self.links.close()
        for conn in list(self.sessions):
            conn.close("relay shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self.shared is not None:
            await self.shared.close()  # this node's leases wait for their agents elsewhere
        if self._admin is not None:
            await self._admin.close()
        for slot in self._slots.values():
            slot.release()
        self._slots.clear()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- sessions --------------------------------------------------------------------------

    def _gate_refused(self, kind: str, source: str) -> None:
        flag = kind.replace("_", "-")
        self._limited(
            Refused(kind, f"reset a connection from {source}: too many handshakes (--max-{flag})")
        )

    def _new_session(self, slot: Slot) -> SessionConnection:
        limits = self.config.limits
        session = new_session(
            Role.RELAY,
            budget=limits.buffer_per_session,
            shared=self._buffers,
            secret=self.config.secret,
            heartbeat=self.config.heartbeat,
            token_verifier=self._token_verifier,
            allow_anonymous=self._anonymous_allowed(),
        )
        conn = SessionConnection(
            session,
            on_stream=self._on_client_stream,
            on_control=self._on_control,
            on_handshake=self._on_handshake,
            on_closed=self._on_session_closed,
        )
        self._slots[conn] = slot
        asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._handshake_deadline, conn)
        return conn

    def _handshake_deadline(self, conn: SessionConnection) -> None:
        if not conn.handshake_done.done() and conn.transport is not None:
            conn.close("no handshake within 10 s")

    def _on_handshake(self, conn: SessionConnection) -> None:
        slot = self._slots.pop(conn, None)
        if slot is not None:
            slot.release()
        self.sessions.add(conn)
        self._by_session[conn.session.session_id] = conn
        if _is_node(conn):
            conn.peer = f"node {conn.session.scope.node} ({conn.peer})"
        if self.metrics is not None:
            self.metrics.sessions.set(len(self.sessions))
        emit(self.on_event, "session_opened", peer=conn.peer, session=conn.session.session_id)

    def _on_session_closed(self, conn: SessionConnection, reason: str) -> None:
        slot = self._slots.pop(conn, None)
        if slot is not None:
            slot.release()
        if conn not in self.sessions:
            if conn.session.close_reason is not None:
                emit(self.on_event, "session_refused", peer=conn.peer, reason=reason)
                self._count_error("handshake")
            return
        self.sessions.discard(conn)
        self._buckets.pop(conn, None)
        session_id = conn.session.session_id
        self._by_session.pop(session_id, None)
        self._closed_bytes[0] += conn.bytes_out
        self._closed_bytes[1] += conn.bytes_in
        if self.metrics is not None:
            self.metrics.sessions.set(len(self.sessions))
        if conn.error:
            self._count_error("protocol")
        emit(self.on_event, "session_closed", peer=conn.peer, reason=reason)
        if self._closing:
            return
        self._spawn(self._release(session_id))

    async def _release(self, session_id: str) -> None:
        """The session's leases wait for their agent; with no grace, they end now."""
        loop = asyncio.get_running_loop()
        released = await self.registry.release(session_id, loop.time())
        if self.config.lease_grace <= 0:
            for lease in released:
                self._lease_gone(lease, expired=False)
        elif released:
            self._schedule_sweep(self.config.lease_grace)

    def _schedule_sweep(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if self._sweep is not None and self._sweep.when() <= when:
            return
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep = loop.call_at(when, lambda: self._spawn(self._expire()))

    async def _expire(self) -> None:
        """Close what lost its lease; sweep again when the next lease is due."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for lease in await self.registry.expire(now):
            if self.links is not None and lease.node != self.config.node_id:
                self.lease_changed(lease.port, lease, None)  # another node's: quietly
            else:
                self._lease_gone(lease, expired=True)
        waiting = [lease.expires for lease in self.registry.leases() if not lease.connected]
        if waiting and not self._closing:
            self._schedule_sweep(max(0.0, min(waiting) - now))

    def _lease_gone(self, lease: Lease, *, expired: bool) -> None:
        """A lease ended: close its listener (TCP) and say so."""
        if isinstance(lease.port, int):
            listener = self.tunnels.get(lease.port)
            if listener is not None and self.registry.resolve(lease.port) is None:
                self._close_listener(listener)
            if expired:
                emit(self.on_event, "lease_expired", port=lease.port)
        else:
            name = str(lease.port[1])  # type: ignore[index]
            emit(self.on_event, "tunnel_closed", kind=lease.kind, name=name)
            if expired:
                emit(self.on_event, "lease_expired", name=name, kind=lease.kind)
        self._count_tunnels()

    # --- control ---------------------------------------------------------------------------

    def _on_control(self, conn: SessionConnection, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        try:
            parsed = parse_control(message)
        except MessageError as exc:
            code = "unknown_op" if str(exc).startswith("unknown op") else "bad_message"
            reply = ErrorReply(
                code=code,
                message=str(exc),
                id=request_id if isinstance(request_id, int) else None,
            )
            conn.send_control(to_message(reply))
            return
        if isinstance(parsed, Register):
            self._spawn(self._register(conn, parsed))
        elif isinstance(parsed, Unregister):
            self._spawn(self._unregister(conn, parsed))
        else:
            conn.send_control(
                to_message(
                    ErrorReply(
                        code="unknown_op",
                        message=f"unknown op {quote(message.get('op'))}",
                        id=parsed.id if isinstance(parsed, Registered | ErrorReply) else None,
                    )
                )
            )

    async def _unregister(self, conn: SessionConnection, message: Unregister) -> None:
        key: LeaseKey
        if message.port is not None:
            key = message.port
        elif message.name is not None and message.kind in self._namespaces:
            key = (self._namespaces[message.kind], message.name)
        else:
            return
        lease = await self.registry.drop(key, conn.session.session_id)
        if lease is not None:
            self._lease_gone(lease, expired=False)

    async def _register(self, conn: SessionConnection, message: Register) -> None:
        kind = message.kind
        key = message.key[:256]
        try:
            self._check_registrations(conn, key)
            if kind in self._namespaces:
                name = await self._register_name(conn, kind, key, message)
                reply = Registered(id=message.id, name=name)
                frontend = self._served_by.get(kind)
                if frontend is not None:
                    reply.url = frontend.describe(kind, name).get("url")
                conn.send_control(to_message(reply))
                self._count_tunnels()
                emit(self.on_event, "tunnel_opened", kind=kind, name=name, peer=conn.peer)
                return
            if kind == "http":
                raise TunnelError(
                    "this relay serves no HTTP tunnels; start it with --http-listen", "bad_kind"
                )
            if kind != "tcp":
                raise TunnelError(
                    f"tunnel kind {quote(kind)} is not served by this relay", "bad_kind"
                )
            self._check_expose(conn, key)
            want = message.port
            if want is not None and not 0 <= want <= 65535:
                raise TunnelError(f"invalid port {want!r}", "bad_port")
            listener = await self._open_tcp(conn, key, want or None, message.exact)
        except TunnelError as exc:
            self._count_error(exc.code)
            emit(self.on_event, "tunnel_refused", peer=conn.peer, code=exc.code, message=str(exc))
            conn.send_control(
                to_message(ErrorReply(code=exc.code, message=str(exc), id=message.id))
            )
            return
        conn.send_control(
            to_message(Registered(id=message.id, port=listener.port, host=self.config.public_host))
        )
        self._count_tunnels()
        emit(self.on_event, "tunnel_opened", kind="tcp", port=listener.port, peer=conn.peer)

    def _check_registrations(self, conn: SessionConnection, key: str) -> None:
        """Refuse a registration past the per-session or per-token ceiling (taking back a
        tunnel this identity already holds is never refused)."""
        holder = self._holder(conn)
        limits = self.config.limits
        mine = [lease for lease in self.registry.leases() if lease.session == holder.session]
        theirs = (
            [lease for lease in self.registry.leases() if lease.token == holder.token]
            if holder.token is not None
            else []
        )
        if any(lease.key == key and lease.owner == holder.identity for lease in mine + theirs):
            return
        if len(mine) >= limits.registrations_per_session:
            refusal = Refused(
                "registrations_per_session",
                f"this session holds {len(mine)} tunnels, the relay's limit "
                "(--max-registrations-per-session)",
            )
        elif len(theirs) >= limits.registrations_per_token:
            refusal = Refused(
                "registrations_per_token",
                f"this token holds {len(theirs)} tunnels, the relay's limit "
                "(--max-registrations-per-token)",
            )
        else:
            return
        self._limited(refusal)
        raise TunnelError(str(refusal), "limited")

    def _check_expose(self, conn: SessionConnection, name: str) -> None:
        problem = self._scope_error(conn, "expose", name)
        if problem is not None:
            raise TunnelError(problem, "not_allowed")

    def _holder(self, conn: SessionConnection) -> Holder:
        session = conn.session
        scope = session.scope
        return Holder(
            identity=session.peer_identity or f"session:{session.session_id}",
            session=session.session_id,
            node=self.config.node_id,
            token=getattr(scope, "token_id", None),
        )

    async def _claim(self, conn: SessionConnection, key: LeaseKey, kind: str, tunnel: str) -> None:
        """Take ``key`` for ``conn``'s agent; tell a session it was taken from."""
        loop = asyncio.get_running_loop()
        claim = await self.registry.claim(
            key, kind=kind, tunnel=tunnel, holder=self._holder(conn), now=loop.time()
        )
        previous = self._by_session.get(claim.moved_from) if claim.moved_from else None
        if previous is not None and previous is not conn and previous.is_open:
            moved = TunnelMoved(key=tunnel, port=key if isinstance(key, int) else None)
            previous.send_control(to_message(moved))

    async def _register_name(
        self, conn: SessionConnection, kind: str, key: str, message: Register
    ) -> str:
        """Give ``conn`` the name it asks for (or a new readable one), held by lease."""
        namespace = self._namespaces[kind]
        wanted = message.name
        if wanted is not None:
            if not NAME_PATTERN.fullmatch(wanted):
                raise TunnelError(
                    f"invalid name {quote(wanted)}: use lowercase letters, digits and "
                    "hyphens (a DNS label, at most 63 characters)",
                    "bad_name",
                )
            self._check_expose(conn, wanted)
            try:
                await self._claim(conn, (namespace, wanted), kind, key)
                return wanted
            except TunnelError as exc:
                if message.exact or exc.code == "registry_unavailable":
                    raise
        for _ in range(50):
            name = readable_name()
            if self.registry.resolve((namespace, name)) is None:
                self._check_expose(conn, name)
                await self._claim(conn, (namespace, name), kind, key)
                return name
        raise TunnelError("could not find a free name; pass one with --name", "no_free_name")

    # --- connectors ---------------------------------------------------------------------------

    def _on_client_stream(
        self, conn: SessionConnection, stream_id: int, info: dict[str, Any]
    ) -> None:
        """A connector opens a stream to a private service or an exit: check, route, join."""
        from burrow.net.join import JoinHalf, join

        try:
            opened = parse_open(info)
        except MessageError as exc:
            conn.reset(stream_id, "not_allowed", str(exc))
            return
        if _is_node(conn):
            self._on_node_stream(conn, stream_id, opened)
            return
        name = opened.service
        if not name:
            conn.reset(stream_id, "not_allowed", "streams must name a service")
            return
        problem = self._scope_error(conn, "connect", name)
        if problem is not None:
            conn.reset(stream_id, "not_allowed", problem)
            emit(self.on_event, "stream_refused", peer=conn.peer, service=name, reason="scope")
            return
        refusal = self._stream_refusal(conn)
        if refusal is not None:
            self._limited(refusal)
            conn.reset(stream_id, "limited", str(refusal))
            return
        lease = self.registry.resolve(("svc", name[:64]))
        if lease is None or self._revoked(lease):
            conn.reset(stream_id, "no_such_tunnel", f"no service named {quote(name)}")
            return
        target = self.target(lease)
        if target is None:
            conn.reset(stream_id, "unreachable", f"service {name!r} is offline (its agent is away)")
            return
        if lease.kind != "exit" and opened.target is not None:
            conn.reset(stream_id, "not_allowed", f"{name!r} is not an exit")
            return
        problem = self.open_visitor(lease.port)
        if problem is not None:
            conn.reset(stream_id, "limited", problem)
            return
        forward = OpenInfo(
            service=name,
            src=opened.src or _peer_address(conn),
            dst=opened.dst,
            target=opened.target if lease.kind == "exit" else None,
            peer=_who(conn),
        )
        near = JoinHalf(conn, stream_id)
        far = JoinHalf(target)
        far.open(forward.to_dict())
        join(near, far)
        key = lease.port
        near.on_done = lambda: self.close_visitor(key)

    def _on_node_stream(self, conn: SessionConnection, stream_id: int, opened: OpenInfo) -> None:
        """A peer node carries a visitor's (or a connector's) stream for a tunnel held here:
        join it to the agent's session. The peer checked the connector's token; the name it
        gives the connector (``peer``) is kept. Served only from this node's own sessions,
        so a stream never goes round the cluster."""
        from burrow.net.join import JoinHalf, join

        key: LeaseKey
        if opened.port is not None:
            key, kind = opened.port, "tcp"
        elif opened.http is not None:
            key, kind = ("http", opened.http[:253]), "http"
        elif opened.service is not None:
            key, kind = ("svc", opened.service[:64]), ""
        else:
            conn.reset(stream_id, "not_allowed", "a stream names a port, a name or a service")
            return
        lease = self.registry.resolve(key)
        if lease is None or (kind and lease.kind != kind) or self._revoked(lease):
            conn.reset(stream_id, "no_such_tunnel", f"no tunnel {_show_key(key)} here")
            return
        agent = self.session_for(lease) if lease.node == self.config.node_id else None
        if agent is None:
            conn.reset(stream_id, "unreachable", f"{_show_key(key)} is not held on this node now")
            return
        if not kind and lease.kind != "exit" and opened.target is not None:
            conn.reset(stream_id, "not_allowed", f"{_show_key(key)!r} is not an exit")
            return
        problem = self.open_visitor(key)
        if problem is not None:
            conn.reset(stream_id, "limited", problem)
            return
        if not kind and lease.kind != "exit":
            opened.target = None
        near = JoinHalf(conn, stream_id)
        far = JoinHalf(agent)
        far.open(opened.to_dict())
        join(near, far)
        near.on_done = lambda: self.close_visitor(key)

    def _stream_refusal(self, conn: SessionConnection) -> Refused | None:
        """Why a client may not open one more stream now (too many open, too many a second)."""
        limits = self.config.limits
        if conn.session.open_streams > limits.streams_per_session:
            return Refused(
                "streams_per_session",
                f"this session has {limits.streams_per_session} open streams, the relay's "
                "limit (--max-streams-per-session)",
            )
        now = asyncio.get_running_loop().time()
        bucket = self._buckets.get(conn)
        if bucket is None:
            rate = limits.opens_per_second
            bucket = self._buckets[conn] = TokenBucket(rate, 2 * rate, now)
        if not bucket.take(now):
            return Refused(
                "opens_per_second",
                f"this session opens more than {limits.opens_per_second:g} streams a second "
                "(--max-opens-per-second)",
            )
        return None

    # --- TCP ports ------------------------------------------------------------------------------

    async def _open_tcp(
        self, conn: SessionConnection, key: str, want: int | None, exact: bool
    ) -> PortListener:
        config = self.config
        loop = asyncio.get_running_loop()
        identity = self._holder(conn).identity
        # The same agent coming back for the same tunnel gets its port, whatever it asked for.
        lease = self.registry.find(identity, key, loop.time()) if key else None
        if (
            lease is not None
            and isinstance(lease.port, int)
            and lease.port in self.tunnels
            and (want is None or want == lease.port)
        ):
            await self._claim(conn, lease.port, "tcp", key)
            return self.tunnels[lease.port]
        if want is not None and not config.min_port <= want <= config.max_port:
            if exact:
                span = f"{config.min_port}-{config.max_port}"
                raise TunnelError(
                    f"port {want} is outside the relay's range {span}", "port_out_of_range"
                )
            want = None
        if want is not None:
            try:
                self.registry.check_free(want, identity, loop.time())
                return await self._take_port(conn, want, key)
            except TunnelError as exc:
                if exact or exc.code == "registry_unavailable":
                    raise
        for _ in range(RANDOM_PORT_TRIES):
            port = random.randint(config.min_port, config.max_port)
            if port in self.tunnels or self.registry.resolve(port) is not None:
                continue
            try:
                return await self._take_port(conn, port, key)
            except TunnelError as exc:
                if exc.code == "registry_unavailable":
                    raise
                continue
        raise TunnelError(
            f"no free port in the relay's range {config.min_port}-{config.max_port}", "no_free_port"
        )

    async def _take_port(self, conn: SessionConnection, port: int, key: str) -> PortListener:
        """Listen on ``port`` (unless this node already does) and claim it for ``conn``."""
        listener = self.tunnels.get(port)
        if listener is None:
            listener = await self._listen(port)
            try:
                await self._claim(conn, port, "tcp", key)
            except BaseException:
                # Unless another node's agent won the port meanwhile: then it is served here.
                if self.registry.resolve(port) is None:
                    self._close_listener(listener, quiet=True)
                raise
            return listener
        await self._claim(conn, port, "tcp", key)
        return listener

    async def _listen(self, port: int) -> PortListener:
        host = self.config.bind_tunnels or self.config.listen_host
        loop = asyncio.get_running_loop()
        listener = PortListener(port=port, relay=self)
        try:
            listener.server = await loop.create_server(
                lambda: self._new_visitor(listener), host, port, reuse_address=True, backlog=1024
            )
        except OSError as exc:
            raise bind_error(host, port, exc, "public port", tunnel_error=True) from None
        self.tunnels[port] = listener
        return listener

    def _close_listener(self, listener: PortListener, *, quiet: bool = False) -> None:
        self.tunnels.pop(listener.port, None)
        if listener.server is not None:
            listener.server.close()
        for visitor in list(listener.visitors):
            visitor.close()
        if not quiet:
            emit(self.on_event, "tunnel_closed", kind="tcp", port=listener.port)

    # --- visitors --------------------------------------------------------------------------

    def _new_visitor(self, listener: PortListener) -> asyncio.Protocol:
        lease = listener.lease
        conn = self.target(lease)
        if lease is None or conn is None or self._revoked(lease):
            return _Refuser()
        if self.open_visitor(listener.port) is not None:
            return _Refuser()
        bridge = StreamBridge(conn, on_done=lambda b: self._visitor_done(listener, b))
        return _VisitorOpener(bridge, listener, self)

    def _visitor_done(self, listener: PortListener, bridge: StreamBridge) -> None:
        listener.visitors.discard(bridge)
        self.close_visitor(listener.port)


class _VisitorOpener(asyncio.Protocol):
    """Opens the stream when the visitor's connection is made, then hands over to the bridge."""

    def __init__(self, bridge: StreamBridge, listener: PortListener, relay: Relay) -> None:
        self.bridge = bridge
        self.listener = listener
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        bridge = self.bridge
        if not bridge.conn.is_open:
            self.relay.close_visitor(self.listener.port)
            transport.close()
            return
        bridge.open(visitor_info(transport, port=self.listener.port))
        self.listener.visitors.add(bridge)
        # From here on the transport talks to the bridge directly.
        bridge.adopt(transport)


class _Refuser(asyncio.Protocol):
    """A visitor of a tunnel whose agent is away: closed at once, cleanly."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def bind_error(
    host: str, port: int, exc: OSError, what: str, *, tunnel_error: bool = False
) -> Exception:
    """The one-line error for a listener that could not bind."""
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


def _who(conn: SessionConnection) -> str:
    """How a connector is named to the services it reaches: its token's subject (or id), the
    shared secret's holder, or an anonymous client of a loopback relay."""
    scope = conn.session.scope
    if scope is not None and getattr(scope, "token_id", None) is not None:
        return str(scope.holder)
    return "secret" if conn.session.secret is not None else "anonymous"


def _is_node(conn: SessionConnection) -> bool:
    """Whether ``conn`` is another node's link (its token carries a ``node`` claim)."""
    return getattr(conn.session.scope, "node", None) is not None


def _show_key(key: LeaseKey) -> str:
    return str(key[1]) if isinstance(key, tuple) else f"port {key}"


def _peer_address(conn: SessionConnection) -> tuple[str, int] | None:
    transport = conn.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None


__all__ = [
    "NAME_PATTERN",
    "Frontend",
    "NamedRoute",
    "PortListener",
    "Relay",
    "RelayConfig",
    "Route",
    "bind_error",
    "readable_name",
]
