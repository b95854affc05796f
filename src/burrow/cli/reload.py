"""``burrow up`` re-reads its ``burrow.toml`` on SIGHUP (``systemctl reload``): tunnels added
are registered, removed ones unregistered and their connections closed, changed ones replaced
(closed, then opened again with the same port or name), and every other tunnel and its
connections left alone. A file that no longer parses changes nothing.

Two parts: ``plan`` (which tunnels changed; pure) and ``FileReloader`` (reads the file, applies
the plan through ``Agent.update_tunnels``, reports).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from burrow.config import AgentFile, TunnelSpec, load_agent_config
from burrow.errors import BurrowError
from burrow.events import EventSink, emit
from burrow.roles.agent import Agent
from burrow.roles.services import Service

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

    async def reload(self, agent: Agent) -> str:
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
