"""The relay's routing state: who holds which public port, HTTP name, private service and exit.

The relay's routing asks a ``Registry`` and keeps no tables of its own beyond the things only a
process can hold (its sessions, its listening sockets). ``MemoryRegistry`` serves one node; a
registry shared by several relay nodes (Redis) or by the serverless relay's handlers
(DynamoDB) implements the same interface, with these rules:

- **Keys.** A TCP tunnel's public port is the key (the number); a name is
  ``("http", NAME)`` for HTTP tunnels, ``("svc", NAME)`` for private services and exits (one
  namespace, since connectors name both the same way).
- **Holder.** A lease belongs to an *identity*: the agent's Ed25519 public key, proven in the
  handshake (``session:ID`` for a client without one, whose leases then die with its session).
  It records the *session* holding it now and the *node* that session is on, so any node can
  route to it; while the holder is away the session is empty and the lease lapses at
  ``expires``, unless the same identity claims it back first.
- **Atomic.** ``claim`` is one compare-and-set per key: it succeeds when the key is free, its
  lease has lapsed, or the claimant is the same identity (which moves the lease to the new
  session); a name held by a service of another kind is ``name_in_use`` even for the same
  identity. Redis: a Lua script over the key's hash; DynamoDB: a conditional PutItem
  (``attribute_not_exists(pk) OR identity = :me OR (attribute_not_exists(session) AND
  expires < :now)``). ``release`` (the session ended) and ``drop`` (the agent gave the tunnel
  up) are conditional on the session that holds the lease, so a late release from an old
  session never frees what a new session took.
- **Time.** No clock inside: callers pass ``now`` (the relay uses its loop's monotonic clock;
  a shared store needs wall-clock time, the same on every node). ``renew`` extends the leases
  of a live session for stores that expire entries by TTL, so a dead node's leases lapse on
  their own; memory needs nothing.

The mutating methods are coroutines because a shared store answers over the network; reads
(``resolve``, ``find``) are synchronous views a shared registry keeps warm locally.

A registry shared by several nodes (``SharedRegistry``: ``burrow.roles.redis_registry``) also
has a life of its own: it is opened with this node's record and told what to call when leases
change elsewhere (``RegistryHooks``), and it lists the nodes of the cluster.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from burrow.errors import TunnelError
from burrow.roles.leases import Lease, LeaseTable, describe

#: How a lease key reads: a port number, or (namespace, name).
LeaseKey = Hashable


@dataclass(frozen=True, slots=True)
class Holder:
    """Who asks for a lease: an identity, through one session, on one relay node."""

    identity: str
    session: str
    node: str = ""
    token: str | None = None  # the scoped token it proved, for revocation


@dataclass(frozen=True, slots=True)
class Claim:
    """What ``claim`` did: the lease now held, and the session it was taken from, if any."""

    lease: Lease
    moved_from: str | None = None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A relay node as its cluster sees it: where peers dial it, the certificate they pin,
    its load, and when it last said it was alive (the store's wall clock)."""

    id: str
    address: str  # HOST:PORT of its control port, as peers dial it
    fingerprint: str | None = None  # None: plaintext control port (--insecure)
    sessions: int = 0
    tunnels: int = 0
    streams: int = 0
    seen: float = 0.0
    started: float = 0.0
    version: str = ""
    instance: str = ""  # this run of the node (a restart is a new instance)


class RegistryHooks(Protocol):
    """What a shared registry tells its relay."""

    def lease_changed(self, key: LeaseKey, old: Lease | None, new: Lease | None) -> None:
        """Another node (or time) changed ``key``: ``new`` None means it is gone."""
        ...

    def lease_lost(self, lease: Lease) -> None:
        """A lease of this node's session was taken while the store could not be reached."""
        ...

    def nodes_changed(self, nodes: Mapping[str, NodeInfo]) -> None:
        """The live nodes of the cluster (this one included)."""
        ...

    def registry_state(self, available: bool, reason: str) -> None:
        """The store became unreachable (``reason``) or reachable again."""
        ...

    def node_load(self) -> tuple[int, int, int]:
        """This node's sessions, tunnels held and open streams, for its record."""
        ...


def kind_conflict(key: LeaseKey, held: str, wanted: str) -> TunnelError | None:
    """A name held by a service of another kind is not this one's to take."""
    if held and wanted and held != wanted:
        return TunnelError(f"{describe(key)} is in use by a {held} service", "name_in_use")
    return None


class Registry(Protocol):
    grace: float

    async def claim(
        self, key: LeaseKey, *, kind: str, tunnel: str, holder: Holder, now: float
    ) -> Claim:
        """Take ``key`` for ``holder`` (atomic), or raise ``TunnelError`` (``*_in_use``)."""
        ...

    def check_free(self, key: LeaseKey, identity: str, now: float) -> None:
        """Raise ``TunnelError`` unless ``identity`` could claim ``key`` now."""
        ...

    async def release(self, session: str, now: float) -> list[Lease]:
        """``session`` ended: its leases wait ``grace`` seconds for their identity."""
        ...

    async def drop(self, key: LeaseKey, session: str) -> Lease | None:
        """The holder gave ``key`` up: free it now (only if ``session`` holds it)."""
        ...

    async def renew(self, session: str, now: float) -> None:
        """Keep ``session``'s leases alive in stores that expire them by TTL."""
        ...

    async def expire(self, now: float) -> list[Lease]:
        """Forget leases whose grace has run out; return them."""
        ...

    def resolve(self, key: LeaseKey) -> Lease | None:
        """The lease on ``key`` (held, or waiting for its holder), if any."""
        ...

    def find(self, identity: str, tunnel: str, now: float) -> Lease | None:
        """The lease ``identity`` holds for its tunnel ``tunnel``, to give a port back."""
        ...

    def leases(self) -> list[Lease]: ...


@runtime_checkable
class SharedRegistry(Registry, Protocol):
    """A registry several relay nodes share."""

    node_id: str
    available: bool
    #: Token ids revoked for the whole cluster, read from the store (the last list known
    #: while it is away); each node refuses them as it refuses its own token.deny.
    denied: frozenset[str]

    async def open(self, node: NodeInfo, hooks: RegistryHooks) -> None:
        """Connect, announce ``node``, load the leases; raise ``ConfigError`` if the store
        cannot be reached or another live node has the same id."""
        ...

    async def close(self) -> None:
        """Release this node's leases (their grace starts) and leave the cluster."""
        ...

    def nodes(self) -> Mapping[str, NodeInfo]:
        """The live nodes, by id."""
        ...


class MemoryRegistry:
    """The registry of one relay node: a lease table in this process."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._table = LeaseTable(grace)

    def __len__(self) -> int:
        return len(self._table)

    async def claim(
        self, key: LeaseKey, *, kind: str, tunnel: str, holder: Holder, now: float
    ) -> Claim:
        table = self._table
        table.check_free(key, holder.identity, now)
        previous = table.get(key)
        if previous is not None:
            conflict = kind_conflict(key, previous.kind, kind)
            if conflict is not None:
                raise conflict
        moved = previous.session if previous is not None and previous.connected else None
        lease = table.take(
            key,
            holder.identity,
            tunnel,
            kind=kind or (previous.kind if previous is not None else ""),
            session=holder.session,
            node=holder.node,
            token=holder.token,
        )
        return Claim(lease, moved if moved != holder.session else None)

    def check_free(self, key: LeaseKey, identity: str, now: float) -> None:
        self._table.check_free(key, identity, now)

    async def release(self, session: str, now: float) -> list[Lease]:
        held = [lease for lease in self._table.leases() if lease.session == session]
        for lease in held:
            if lease.connected:
                self._table.release(lease.port, now)
        return held

    async def drop(self, key: LeaseKey, session: str) -> Lease | None:
        lease = self._table.get(key)
        if lease is None or lease.session != session:
            return None
        self._table.drop(key)
        return lease

    async def renew(self, session: str, now: float) -> None:
        return None

    async def expire(self, now: float) -> list[Lease]:
        gone = [x for x in self._table.leases() if not x.connected and x.expires <= now]
        self._table.expire(now)
        return gone

    def resolve(self, key: LeaseKey) -> Lease | None:
        return self._table.get(key)

    #: The lease table's own name for ``resolve``.
    get = resolve

    def find(self, identity: str, tunnel: str, now: float) -> Lease | None:
        return self._table.find(identity, tunnel, now)

    def leases(self) -> list[Lease]:
        return self._table.leases()
