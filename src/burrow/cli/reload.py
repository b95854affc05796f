"""``burrow up`` re-reads its ``burrow.toml`` on SIGHUP (``systemctl reload``): tunnels added
are registered, removed ones unregistered and their connections closed, changed ones replaced
(closed, then opened again with the same port or name), and every other tunnel and its
connections left alone. A file that no longer parses changes nothing.

Three parts: ``plan`` (which tunnels changed; pure), ``ReloadableAgent`` (an agent whose
services can be changed on a live session; its methods are meant to move into
``burrow.roles.agent.Agent``), and ``FileReloader`` (reads the file, applies the plan, reports).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from burrow.config import AgentFile, TunnelSpec, load_agent_config
from burrow.errors import BurrowError, TunnelError
from burrow.events import EventSink, emit
from burrow.net.connection import SessionConnection
from burrow.roles.agent import Agent, AgentConfig
from burrow.roles.services import ActiveTunnel, Service
from burrow.wire.messages import MessageError, Unregister, parse_open, to_message

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# --- the plan (pure) --------------------------------------------------------------------------


@dataclass
class Plan(Generic[K]):
    """How a new list of tunnels differs from the running one, by identity."""

    added: list[K] = field(default_factory=list)
    removed: list[K] = field(default_factory=list)
    changed: list[K] = field(default_factory=list)
    kept: list[K] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def plan(old: Mapping[K, V], new: Mapping[K, V]) -> Plan[K]:
    """Compare two ``identity -> settings`` maps (in the new file's order, then the old's)."""
    result: Plan[K] = Plan()
    for key, value in new.items():
        if key not in old:
            result.added.append(key)
        elif old[key] != value:
            result.changed.append(key)
        else:
            result.kept.append(key)
    result.removed = [key for key in old if key not in new]
    return result


def identity(spec: TunnelSpec, service: Service) -> tuple[str, str]:
    """What makes two ``[[tunnel]]`` tables the same tunnel: its kind and the key its lease
    follows (its name; for an unnamed http tunnel, its local address)."""
    return (spec.kind, service.key)


# --- an agent whose services change while it runs -------------------------------------------

#: The tunnel whose stream is being served: set around ``on_stream`` and inherited by the
#: tasks it spawns, so every connection the agent tracks is known by its tunnel.
_serving: contextvars.ContextVar[ActiveTunnel | None] = contextvars.ContextVar(
    "burrow_serving", default=None
)


class ReloadableAgent(Agent):
    """An ``Agent`` with ``update_tunnels``. It only adds to ``Agent``: the methods below are
    written so they can move into it as they are (see the packaging report)."""

    def __init__(self, config: AgentConfig, *, on_event: EventSink | None = None) -> None:
        super().__init__(config, on_event=on_event)
        self._owners: dict[Any, ActiveTunnel] = {}  # tracked item or task -> its tunnel
        self._changing = asyncio.Lock()

    async def on_session(self, conn: SessionConnection) -> None:
        async with self._changing:  # never register while tunnels are being changed
            await super().on_session(conn)

    def on_stream(self, conn: SessionConnection, stream_id: int, info: dict[str, Any]) -> None:
        token = _serving.set(self._tunnel_for(info))
        try:
            super().on_stream(conn, stream_id, info)
        finally:
            _serving.reset(token)

    def _tunnel_for(self, info: dict[str, Any]) -> ActiveTunnel | None:
        try:
            opened = parse_open(info)
        except MessageError:
            return None
        if opened.port is not None:
            return self._by_port.get(opened.port)
        if opened.http is not None:
            return self._by_name.get(("http", opened.http))
        if opened.service is not None:
            return self._by_name.get(("svc", opened.service))
        return None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = super().spawn(coro)
        tunnel = _serving.get()
        if tunnel is not None:
            self._owners[task] = tunnel
            task.add_done_callback(lambda done: self._owners.pop(done, None))
        return task

    def track(self, item: Any, closer: Callable[[], None]) -> None:
        super().track(item, closer)
        tunnel = _serving.get()
        if tunnel is not None:
            self._owners[item] = tunnel

    def untrack(self, item: Any) -> None:
        super().untrack(item)
        self._owners.pop(item, None)

    async def update_tunnels(
        self, *, add: Sequence[Service] = (), remove: Sequence[ActiveTunnel] = ()
    ) -> list[tuple[Service, BurrowError]]:
        """Change what this agent offers without touching its other tunnels. Each tunnel in
        ``remove`` is unregistered and its open connections are closed; each service in
        ``add`` is registered on the live session (or on the next one, if it is down).
        Returns the added services the relay refused: they are not kept, so a later
        reconnect does not fail on them."""
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


# --- the file ---------------------------------------------------------------------------------

_RELAY_SETTINGS = ("relay", "secret", "token", "fingerprint", "ca", "insecure")


@dataclass
class FileReloader:
    """Applies a ``burrow.toml`` again to the agent that ``burrow up`` started from it."""

    path: Path
    file: AgentFile
    services: list[Service]
    on_event: EventSink
    build: Callable[[TunnelSpec, Path], Service]
    #: identity -> (its table in the file, the service running for it)
    current: dict[tuple[str, str], tuple[TunnelSpec, Service]] = field(init=False)

    def __post_init__(self) -> None:
        self.current = {
            identity(spec, service): (spec, service)
            for spec, service in zip(self.file.tunnels, self.services, strict=True)
        }

    async def reload(self, agent: ReloadableAgent) -> str:
        """Read the file and apply it; returns a one-line summary (systemd's STATUS)."""
        try:
            file = load_agent_config(self.path)
            built = [(spec, self.build(spec, self.path.parent)) for spec in file.tunnels]
        except BurrowError as exc:
            emit(
                self.on_event,
                "warning",
                message=f"reload failed, still serving the previous tunnels: {exc}",
            )
            return f"reload failed: {exc}"
        changed_settings = [
            key for key in _RELAY_SETTINGS if getattr(file, key) != getattr(self.file, key)
        ]
        if changed_settings:
            emit(
                self.on_event,
                "warning",
                message=f"{self.path}: {', '.join(changed_settings)} changed; restart "
                "burrow up to apply them (a reload changes tunnels only)",
            )
        wanted = {identity(spec, service): (spec, service) for spec, service in built}
        steps = plan(
            {key: spec for key, (spec, _) in self.current.items()},
            {key: spec for key, (spec, _) in wanted.items()},
        )
        running = {id(t.spec): t for t in agent.tunnels}
        gone = [
            running[id(self.current[key][1])]
            for key in [*steps.removed, *steps.changed]
            if id(self.current[key][1]) in running
        ]
        new = [wanted[key][1] for key in [*steps.changed, *steps.added]]
        refused = await agent.update_tunnels(add=new, remove=gone)
        for service, why in refused:
            emit(self.on_event, "warning", message=f"reload: tunnel {service.key}: {why}")
        not_running = {id(service) for service, _ in refused}
        current = {key: self.current[key] for key in steps.kept}
        current.update(
            (key, wanted[key])
            for key in [*steps.changed, *steps.added]
            if id(wanted[key][1]) not in not_running
        )
        self.current = current
        summary = {
            "added": [_label(k) for k in steps.added],
            "removed": [_label(k) for k in steps.removed],
            "changed": [_label(k) for k in steps.changed],
            "refused": [service.key for service, _ in refused],
        }
        emit(self.on_event, "reloaded", config=str(self.path), **summary)
        return "reloaded: " + ", ".join(f"{len(v)} {k}" for k, v in summary.items())


def _label(key: Hashable) -> str:
    return str(key[1]) if isinstance(key, tuple) else str(key)


# --- SIGHUP -----------------------------------------------------------------------------------


class HangupReloads:
    """SIGHUP runs ``reload`` once at a time: a signal during a reload (or during start-up,
    before ``arm``) runs one more reload after it, so the last edit is always applied."""

    def __init__(self, reload: Callable[[], Awaitable[None]]) -> None:
        import signal

        self._reload = reload
        self._pending = False
        self._armed = False
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._installed = False
        try:
            self._loop.add_signal_handler(signal.SIGHUP, self.request)
            self._installed = True
        except (NotImplementedError, RuntimeError, AttributeError):
            pass

    def request(self) -> None:
        self._pending = True
        if self._armed and self._task is None:
            self._task = self._loop.create_task(self._run())

    def arm(self) -> None:
        """Start-up is over: reloads may run (one now, if a signal came meanwhile)."""
        self._armed = True
        if self._pending:
            self.request()

    async def _run(self) -> None:
        try:
            while self._pending:
                self._pending = False
                await self._reload()
        finally:
            self._task = None

    async def close(self) -> None:
        if self._installed:
            import signal

            self._loop.remove_signal_handler(signal.SIGHUP)
        self._armed = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
