"""The agent: dials out to a relay, registers the services it offers, and hands each stream
the relay opens to the service it is for.

Services are objects of ``burrow.roles.services.Service`` (TCP, private and exit kinds live
there; HTTP in ``burrow.http.service``; others elsewhere); the agent knows only the relay's
faces: a public port, or a name. Every service is registered again, with the same port or
name, after a reconnect (see ``RelayClient``), and ports and names are remembered in the state
directory so a restarted agent asks for them again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from burrow.errors import BurrowError, ConfigError, TunnelError
from burrow.events import EventSink, emit, format_hostport
from burrow.net.bridge import StreamBridge
from burrow.net.connection import SessionConnection
from burrow.roles.client import ClientConfig, RelayClient
from burrow.roles.identity import load_or_create_identity
from burrow.roles.services import (
    ActiveTunnel,
    ExitSpec,
    IncomingStream,
    Service,
    TcpTunnelSpec,
)
from burrow.statefiles import write_replace
from burrow.wire.messages import (
    Closed,
    ErrorReply,
    MessageError,
    Register,
    Registered,
    TunnelMoved,
    Unregister,
    parse_control,
    parse_open,
    to_message,
)

__all__ = [
    "ActiveTunnel",
    "Agent",
    "AgentConfig",
    "ExitSpec",
    "TcpTunnelSpec",
    "load_or_create_identity",
]

log = logging.getLogger("burrow.agent")


@dataclass
class AgentConfig(ClientConfig):
    tunnels: list[Service] = field(default_factory=list)
    state_dir: Path | None = None  # where ports and names are remembered across restarts
    public_host: str | None = None  # override the host shown in public addresses


class Agent(RelayClient):
    """``await start()`` returns once every tunnel is ready (or raises); ``close()`` ends all."""

    role_name = "agent"

    def __init__(self, config: AgentConfig, *, on_event: EventSink | None = None) -> None:
        if not config.tunnels:
            raise ConfigError("no tunnels to open")
        super().__init__(config, on_event=on_event)
        if self.identity is None:  # leases survive reconnects of this process at least
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            self.identity = Ed25519PrivateKey.generate()
        self.config = config
        self.tunnels = [ActiveTunnel(spec) for spec in config.tunnels]
        self._by_port: dict[int, ActiveTunnel] = {}
        self._by_name: dict[tuple[str, str], ActiveTunnel] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tracked: dict[Any, Callable[[], None]] = {}
        self._owners: dict[Any, ActiveTunnel] = {}  # tracked item or task -> its tunnel
        self._changing = asyncio.Lock()  # registrations and tunnel changes, one at a time
        self._remembered = self._load_ports()

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _bridges(self) -> set[StreamBridge]:
        """The socket bridges of the streams open now."""
        return {item for item in self._tracked if isinstance(item, StreamBridge)}

    async def on_close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for closer in list(self._tracked.values()):
            closer()

    # --- what services may ask of the agent ---------------------------------------------------

    def spawn(
        self, coro: Coroutine[Any, Any, Any], owner: ActiveTunnel | None = None
    ) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if owner is not None:
            self._owners[task] = owner
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._owners.pop(task, None)

    def track(
        self, item: Any, closer: Callable[[], None], owner: ActiveTunnel | None = None
    ) -> None:
        """Close ``item`` with ``closer`` if the agent shuts down (or ``owner`` is removed)
        before it ends."""
        self._tracked[item] = closer
        if owner is not None:
            self._owners[item] = owner

    def untrack(self, item: Any) -> None:
        self._tracked.pop(item, None)
        self._owners.pop(item, None)

    async def update_tunnels(
        self, *, add: Sequence[Service] = (), remove: Sequence[ActiveTunnel] = ()
    ) -> list[tuple[Service, BurrowError]]:
        """Change what this agent offers without touching its other tunnels (a reload). Each
        tunnel in ``remove`` is unregistered and its open connections are closed; each service
        in ``add`` is registered on the live session (or on the next one, if it is down).
        Returns the added services the relay refused: they are not kept, so a later reconnect
        does not fail on them."""
        refused: list[tuple[Service, BurrowError]] = []
        async with self._changing:
            conn = self.conn if self.conn is not None and self.conn.is_open else None
            for tunnel in remove:
                if tunnel in self.tunnels:
                    self._remove(conn, tunnel)
            for service in add:
                tunnel = ActiveTunnel(service)
                self.tunnels.append(tunnel)
                if conn is None:
                    continue  # on_session registers it when the session is back
                try:
                    await self._register(conn, tunnel)
                except TunnelError as exc:
                    self.tunnels.remove(tunnel)
                    refused.append((service, exc))
                except (ConnectionError, TimeoutError):
                    pass  # the session ended meanwhile: the next on_session registers it
        return refused

    def _remove(self, conn: SessionConnection | None, tunnel: ActiveTunnel) -> None:
        self.tunnels.remove(tunnel)
        for port in [k for k, held in self._by_port.items() if held is tunnel]:
            del self._by_port[port]
        for name in [k for k, held in self._by_name.items() if held is tunnel]:
            del self._by_name[name]
        if conn is not None and (tunnel.port is not None or tunnel.name is not None):
            message = (
                Unregister(port=tunnel.port)
                if tunnel.port is not None
                else Unregister(name=tunnel.name, kind=tunnel.spec.kind)
            )
            conn.send_control(to_message(message))
        for item, owner in list(self._owners.items()):
            if owner is not tunnel:
                continue
            if isinstance(item, asyncio.Task):
                item.cancel()
            elif (closer := self._tracked.get(item)) is not None:
                closer()
        emit(
            self.on_event,
            "tunnel_removed",
            kind=tunnel.spec.kind,
            name=tunnel.name or tunnel.spec.key,
            public=tunnel.public,
        )

    # --- registration ------------------------------------------------------------------------

    async def on_session(self, conn: SessionConnection) -> None:
        async with self._changing:  # never register while tunnels are being changed
            self._by_port.clear()
            self._by_name.clear()
            for tunnel in list(self.tunnels):
                await self._register(conn, tunnel)

    async def _register(self, conn: SessionConnection, tunnel: ActiveTunnel) -> None:
        spec = tunnel.spec
        remembered = self._remembered.get(spec.key)
        message = Register(kind=spec.kind, key=spec.key)
        if spec.kind == "tcp":
            asked = getattr(spec, "port", None)
            message.port = (
                asked or tunnel.port or (remembered if isinstance(remembered, int) else None)
            )
            message.exact = asked is not None
        else:
            message.name = (
                spec.name or tunnel.name or (remembered if isinstance(remembered, str) else None)
            )
            message.exact = spec.name is not None
        raw = await self.request(conn, to_message(message))
        try:
            reply = parse_control(raw)
        except MessageError as exc:
            raise TunnelError(
                f"relay {self.relay_label} answered oddly: {exc}", "bad_reply"
            ) from None
        if isinstance(reply, ErrorReply) or not isinstance(reply, Registered):
            code = reply.code if isinstance(reply, ErrorReply) else "bad_reply"
            text = reply.message if isinstance(reply, ErrorReply) else "an unexpected reply"
            raise TunnelError(
                f"relay {self.relay_label} refused {spec.kind} tunnel {spec.key}: {text}", code
            )
        event: dict[str, Any] = {"kind": spec.kind, "name": spec.key}
        if spec.kind == "tcp":
            if reply.port is None:
                raise TunnelError(f"relay {self.relay_label} gave no port", "bad_reply")
            tunnel.port = reply.port
            self._by_port[reply.port] = tunnel
            host = self.config.public_host or reply.host or self.config.relay[0]
            tunnel.public = format_hostport(str(host), reply.port)
            self._remember(spec.key, reply.port)
            event["public"] = tunnel.public
        else:
            if reply.name is None:
                raise TunnelError(f"relay {self.relay_label} gave no name", "bad_reply")
            tunnel.name = reply.name
            self._by_name[(_namespace(spec.kind), reply.name)] = tunnel
            self._remember(spec.key, reply.name)
            tunnel.public = reply.url or reply.name
            event["name"] = reply.name
            if reply.url:
                event["url"] = reply.url
        spec.registered(tunnel)
        event.update(spec.describe())
        emit(self.on_event, "tunnel_ready", **event)

    def on_message(self, conn: SessionConnection, message: dict[str, Any]) -> None:
        try:
            parsed = parse_control(message)
        except MessageError:
            return
        if isinstance(parsed, TunnelMoved):
            self._fail(
                TunnelError(
                    f"another agent with this identity took over tunnel {parsed.key}", "moved"
                )
            )
        elif isinstance(parsed, Closed):
            self._fail(
                TunnelError(f"relay closed tunnel {parsed.key}: {parsed.message}", parsed.code)
            )

    # --- streams -----------------------------------------------------------------------------

    def on_stream(self, conn: SessionConnection, stream_id: int, info: dict[str, Any]) -> None:
        try:
            opened = parse_open(info)
        except MessageError as exc:
            conn.reset(stream_id, "not_allowed", str(exc))
            return
        if opened.port is not None:
            tunnel = self._by_port.get(opened.port)
        elif opened.http is not None:
            tunnel = self._by_name.get(("http", opened.http))
        elif opened.service is not None:
            tunnel = self._by_name.get(("svc", opened.service))
        else:
            tunnel = None
        if tunnel is None:
            conn.reset(stream_id, "no_such_tunnel", "this agent has no such tunnel")
            return
        tunnel.connections += 1
        tunnel.open_connections += 1
        tunnel.spec.serve(IncomingStream(conn, stream_id, info, tunnel, self, opened))

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
        if self._remembered.get(key) == value:
            return
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
            write_replace(path, json.dumps(data, indent=1).encode(), 0o600)
        except OSError as exc:
            log.warning("cannot remember ports in %s: %s", path, exc)


def _namespace(kind: str) -> str:
    """The relay's namespace for a named kind: HTTP names apart, services and exits together."""
    return "http" if kind == "http" else "svc"
