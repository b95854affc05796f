"""Leases: who holds which public port or name, and for how long after its agent went away.

A lease belongs to an agent identity (its Ed25519 public key) and a tunnel key chosen by the
agent. While the agent is connected the lease is live; when its session ends the lease is
held for a grace period in which only the same identity can take the port back. No clock
inside: callers pass ``now``, so the rules are tested without sleeping.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from burrow.errors import TunnelError


def describe(key: Hashable) -> str:
    """How a lease key reads in a message: ``port 20001`` or ``name 'db'``."""
    if isinstance(key, tuple) and len(key) == 2:
        return f"name {key[1]!r}"
    return f"port {key}"


@dataclass(slots=True)
class Lease:
    port: Hashable  # a port number, or (namespace, name) for a named service
    owner: str  # the agent's identity
    key: str  # the agent's name for the tunnel
    connected: bool = True
    expires: float = 0.0  # meaningful while not connected
    kind: str = ""  # tcp, http, private, exit
    session: str = ""  # the session holding it (the last one, while not connected)
    node: str = ""  # the relay node of that session
    token: str | None = None  # the token the holder proved, for revocation


class LeaseTable:
    """Leases by port or name, for one relay node."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._by_port: dict[Hashable, Lease] = {}

    def __len__(self) -> int:
        return len(self._by_port)

    def get(self, port: Hashable) -> Lease | None:
        return self._by_port.get(port)

    def find(self, owner: str, key: str, now: float) -> Lease | None:
        """The lease ``owner`` holds for ``key``, if any is still valid."""
        self.expire(now)
        for lease in self._by_port.values():
            if lease.owner == owner and lease.key == key:
                return lease
        return None

    def check_free(self, port: Hashable, owner: str, now: float) -> None:
        """Raise unless ``owner`` may take ``port`` (free, expired, or its own)."""
        lease = self._by_port.get(port)
        if lease is None or lease.owner == owner:
            return
        if lease.connected:
            raise in_use(port)
        if lease.expires > now:
            raise reserved(port, lease.expires - now)

    def take(
        self,
        port: Hashable,
        owner: str,
        key: str,
        *,
        kind: str = "",
        session: str = "",
        node: str = "",
        token: str | None = None,
    ) -> Lease:
        lease = Lease(port, owner, key, kind=kind, session=session, node=node, token=token)
        self._by_port[port] = lease
        return lease

    def leases(self) -> list[Lease]:
        return list(self._by_port.values())

    def put(self, lease: Lease) -> Lease | None:
        """Store ``lease`` as another store decided it (a mirror of a shared registry);
        return the one it replaces."""
        previous = self._by_port.get(lease.port)
        self._by_port[lease.port] = lease
        return previous

    def pop(self, port: Hashable) -> Lease | None:
        """Forget ``port``'s lease and return it (a mirror learning it is gone)."""
        return self._by_port.pop(port, None)

    def clear(self) -> None:
        self._by_port.clear()

    def release(self, port: Hashable, now: float) -> None:
        """The agent's session ended: keep the port for the grace period."""
        lease = self._by_port.get(port)
        if lease is not None:
            lease.connected = False
            lease.expires = now + self.grace
            if self.grace <= 0:
                del self._by_port[port]

    def drop(self, port: Hashable) -> None:
        """The agent closed the tunnel on purpose: free the port at once."""
        self._by_port.pop(port, None)

    def expire(self, now: float) -> list[Hashable]:
        """Forget leases whose grace has run out; return their ports."""
        gone = [
            p for p, lease in self._by_port.items() if not lease.connected and lease.expires <= now
        ]
        for port in gone:
            del self._by_port[port]
        return gone


def in_use(key: Hashable) -> TunnelError:
    """The refusal of a key another agent holds now."""
    return TunnelError(f"{describe(key)} is in use by another agent", _in_use(key))


def reserved(key: Hashable, remaining: float) -> TunnelError:
    """The refusal of a key kept ``remaining`` seconds more for an agent that went away."""
    return TunnelError(
        f"{describe(key)} is reserved for another agent for {remaining:.0f} s "
        "more (its lease survives a reconnect); ask for another or wait",
        _in_use(key),
    )


def _in_use(key: Hashable) -> str:
    return "name_in_use" if isinstance(key, tuple) else "port_in_use"
