"""Port leases: who holds which public port, and for how long after its agent went away.

A lease belongs to an agent identity (its Ed25519 public key) and a tunnel key chosen by the
agent. While the agent is connected the lease is live; when its session ends the lease is
held for a grace period in which only the same identity can take the port back. No clock
inside: callers pass ``now``, so the rules are tested without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass

from burrow.errors import TunnelError


@dataclass(slots=True)
class Lease:
    port: int
    owner: str  # the agent's identity
    key: str  # the agent's name for the tunnel
    connected: bool = True
    expires: float = 0.0  # meaningful while not connected


class LeaseTable:
    """Leases by port, for one relay node."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._by_port: dict[int, Lease] = {}

    def __len__(self) -> int:
        return len(self._by_port)

    def get(self, port: int) -> Lease | None:
        return self._by_port.get(port)

    def find(self, owner: str, key: str, now: float) -> Lease | None:
        """The lease ``owner`` holds for ``key``, if any is still valid."""
        self.expire(now)
        for lease in self._by_port.values():
            if lease.owner == owner and lease.key == key:
                return lease
        return None

    def check_free(self, port: int, owner: str, now: float) -> None:
        """Raise unless ``owner`` may take ``port`` (free, expired, or its own)."""
        lease = self._by_port.get(port)
        if lease is None or lease.owner == owner:
            return
        if lease.connected:
            raise TunnelError(f"port {port} is in use by another agent", "port_in_use")
        if lease.expires > now:
            raise TunnelError(
                f"port {port} is reserved for another agent for {lease.expires - now:.0f} s more "
                "(its lease survives a reconnect); ask for another port or wait",
                "port_in_use",
            )

    def take(self, port: int, owner: str, key: str) -> Lease:
        lease = Lease(port, owner, key)
        self._by_port[port] = lease
        return lease

    def release(self, port: int, now: float) -> None:
        """The agent's session ended: keep the port for the grace period."""
        lease = self._by_port.get(port)
        if lease is not None:
            lease.connected = False
            lease.expires = now + self.grace
            if self.grace <= 0:
                del self._by_port[port]

    def drop(self, port: int) -> None:
        """The agent closed the tunnel on purpose: free the port at once."""
        self._by_port.pop(port, None)

    def expire(self, now: float) -> list[int]:
        """Forget leases whose grace has run out; return their ports."""
        gone = [
            p for p, lease in self._by_port.items() if not lease.connected and lease.expires <= now
        ]
        for port in gone:
            del self._by_port[port]
        return gone
