"""A registry shared by several relay nodes, in Redis (``burrow relay --registry redis://...``).

Claims, releases, drops and renewals are Lua scripts (``burrow.roles.redis_leases``), so two
nodes racing for a name are settled by Redis, once. Every node keeps a mirror of all leases,
loaded at start and kept current from the change channel, so the relay's reads stay
synchronous and cheap. The node renews its sessions' leases every few seconds (a dead node's
lapse on their own) and keeps its record (``burrow:node:<id>``: address, fingerprint, load).

When Redis cannot be reached, routing goes on from the mirror, claims are refused with
``registry unavailable: ...; try again``, and releases wait; once it answers again the node
claims once more what its live sessions hold, applies what waited, and reloads the mirror.

Revoked token ids live in one Redis set (``burrow token revoke --registry``), read at start,
at each reload and whenever the channel says it changed, so a revocation reaches every node
without touching their state directories; while Redis is away a node keeps the last list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from burrow.errors import ConfigError, TunnelError
from burrow.roles import redis_leases as rl
from burrow.roles.leases import Lease
from burrow.roles.registry import Claim, Holder, NodeInfo, RegistryHooks

log = logging.getLogger("burrow.registry")

#: How long a held lease lasts without a renewal, and how often its node renews it.
LEASE_TTL = 15.0
RENEW_EVERY = 5.0
#: A node's record lasts this long without a refresh (refreshed with the renewals).
NODE_TTL = 15.0
#: A full reload of the mirror this often corrects anything a lost message left behind.
RELOAD_EVERY = 30.0
#: How often a node whose Redis went away tries again.
RETRY_EVERY = 1.0
#: The longest one Redis call may take before Redis counts as unreachable.
OP_TIMEOUT = 3.0
#: Keys per renewal script call.
RENEW_BATCH = 256
#: A lease of a live node missing from a reload is kept this long for its node to claim it
#: again (Redis restarted empty: every node re-asserts its own within a retry or two).
UNCONFIRMED_FOR = 3 * RETRY_EVERY + OP_TIMEOUT
#: A node missing from the listings this long is taken for dead (its record, renewed every
#: 5 s, lapsed 15 s after its last renewal already): a late listing or a Redis that came back
#: empty does not make a live node's leases look abandoned.
NODE_GONE_AFTER = 2 * RENEW_EVERY + UNCONFIRMED_FOR

_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError)


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, *_ERRORS)


def shown_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str) -> str:
    """Refuse what cannot be a Redis URL, saying what is expected."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or len(url) > 1024:
        raise ConfigError(
            f"--registry {shown_url(url)[:80]!r} is not a Redis URL; expected "
            "redis://HOST:PORT/DB (rediss:// for TLS)"
        )
    try:
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        raise ConfigError(f"--registry {shown_url(url)!r} has an invalid port") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"--registry {shown_url(url)!r}: the database must be a number")
    return url


def database(url: str) -> int:
    """The database number a Redis URL selects (0 unless the path or ``?db=`` says)."""
    from urllib.parse import parse_qs

    parts = urlsplit(url)
    path = parts.path.strip("/") if parts.scheme != "unix" else ""
    if path.isdigit():
        return int(path)
    given = parse_qs(parts.query).get("db", ["0"])[0]
    return int(given) if given.isdigit() else 0


def is_plaintext_remote(url: str) -> bool:
    """A ``redis://`` URL to another machine: the registry's traffic would cross in clear."""
    import ipaddress

    parts = urlsplit(url)
    if parts.scheme != "redis":
        return False
    host = parts.hostname or "localhost"
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def connect(url: str) -> Any:
    """A redis-py asyncio client for ``url`` that fails fast (the node decides when to retry)."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        check_url(url),
        socket_connect_timeout=OP_TIMEOUT,
        socket_timeout=OP_TIMEOUT + 2,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=RENEW_EVERY,
        client_name="burrow",
    )


@dataclass(frozen=True, slots=True)
class _Held:
    """A claim this node made for one of its sessions, to renew and to assert again."""

    kind: str
    tunnel: str
    holder: Holder


class RedisRegistry:
    """``SharedRegistry`` over Redis; ``await open()`` before use, ``await close()`` after."""

    def __init__(
        self,
        url: str,
        *,
        grace: float,
        node_id: str,
        lease_ttl: float = LEASE_TTL,
        renew_every: float = RENEW_EVERY,
        clock_skew: float = 0.0,
    ) -> None:
        self.url = check_url(url)
        #: Pub/sub is not per database: the channel carries the database's number, so clusters
        #: in two databases of one Redis never hear each other.
        self.channel = f"{rl.CHANNEL}:{database(url)}"
        self.grace = grace
        self.node_id = node_id
        self.lease_ttl = lease_ttl
        self.renew_every = renew_every
        #: Seconds added to Redis's clock in the scripts: 0, except for tests of the rules.
        self.clock_skew = clock_skew
        self.available = False
        self.down_reason = "not connected yet"
        self.mirror = rl.Mirror()
        self._held: dict[Hashable, _Held] = {}
        self._pending_releases: list[tuple[str, list[Hashable]]] = []
        self._pending_drops: list[tuple[Hashable, str]] = []
        self._unconfirmed: dict[Hashable, float] = {}  # key -> local deadline
        self._nodes: dict[str, NodeInfo] = {}
        self._seen_at: dict[str, float] = {}  # node id -> when a listing last had it
        self._node: NodeInfo | None = None
        self._hooks: RegistryHooks | None = None
        self._client: Any = None
        self._pubsub: Any = None
        self._scripts: dict[str, Any] = {}
        self._runner: asyncio.Task[None] | None = None
        self._broken = asyncio.Event()
        self._closing = False
        self._last_reload = 0.0
        self._nodes_stale = True
        #: Token ids revoked for the whole cluster (the relay adds its own token.deny).
        self.denied: frozenset[str] = frozenset()
        self._denied_stale = False

    def __len__(self) -> int:
        return len(self.mirror.table)

    # --- life ----------------------------------------------------------------------------------

    async def open(self, node: NodeInfo, hooks: RegistryHooks) -> None:
        self._node = node
        self._hooks = hooks
        self._client = connect(self.url)
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in (
                ("claim", rl.CLAIM),
                ("release", rl.RELEASE),
                ("drop", rl.DROP),
                ("renew", rl.RENEW),
                ("snapshot", rl.SNAPSHOT),
                ("node", rl.NODE),
            )
        }
        failures: tuple[type[BaseException], ...] = (
            RegistryUnavailable,
            _Broken,
            *_redis_errors(),
        )
        try:
            async with asyncio.timeout(3 * OP_TIMEOUT):
                await self._connect()
        except ConfigError:
            await self._disconnect()
            raise
        except failures as exc:
            await self._disconnect()
            reason = self.down_reason if isinstance(exc, TunnelError | _Broken) else _reason(exc)
            raise ConfigError(
                f"cannot reach the registry {shown_url(self.url)}: {reason}"
            ) from None
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closing = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        if self.available and self._client is not None:
            with contextlib.suppress(*_redis_errors(), TimeoutError):
                async with asyncio.timeout(OP_TIMEOUT):
                    for session in {held.holder.session for held in self._held.values()}:
                        await self.release(session, 0.0)
                    await self._client.delete(rl.node_key(self.node_id))
                    await self._client.publish(
                        self.channel, f'{{"op":"node","id":"{self.node_id}"}}'
                    )
        self.available = False
        await self._disconnect()

    async def _disconnect(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _connect(self) -> None:
        """Subscribe, announce this node, claim again what live sessions hold, apply what
        waited, and load the mirror: the state after a start or a comeback."""
        assert self._client is not None
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self.channel)
        await self._announce()
        await self._flush_pending()
        await self._reassert()
        await self._load_nodes()
        await self._reload()
        await self._load_denied()
        self._broken.clear()
        if not self.available:
            self.available = True
            self.down_reason = ""
            if self._hooks is not None and self._runner is not None:  # back, not the start
                self._hooks.registry_state(True, "")

    def _down(self, exc: BaseException | str) -> None:
        reason = exc if isinstance(exc, str) else _reason(exc)
        self._broken.set()
        self.down_reason = reason
        if self.available:
            self.available = False
            log.warning("registry %s unreachable: %s", shown_url(self.url), reason)
            if self._hooks is not None:
                self._hooks.registry_state(False, reason)

    async def _run(self) -> None:
        """Listen and tick while Redis answers; try again every second while it does not."""
        errors = _redis_errors()
        while not self._closing:
            if not self.available:
                try:
                    async with asyncio.timeout(3 * OP_TIMEOUT):
                        await self._connect()
                except errors as exc:
                    self._down(exc)
                    await asyncio.sleep(RETRY_EVERY)
                    continue
                except (RegistryUnavailable, _Broken):
                    await asyncio.sleep(RETRY_EVERY)
                    continue
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._listen())
                    group.create_task(self._tick())
            except* errors as failed:
                self._down(failed.exceptions[0])
            except* (RegistryUnavailable, _Broken):
                self._down(self.down_reason or "a call failed")

    async def _listen(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        while not self._closing:
            if self._broken.is_set():
                raise _Broken()
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message.get("type") == "message":
                self._on_message(message.get("data"))
            if self._denied_stale:
                await self._load_denied()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.renew_every
        while not self._closing:
            await asyncio.sleep(min(1.0, self.renew_every))
            if self._broken.is_set():
                raise _Broken()
            if self._nodes_stale:
                await self._load_nodes()
            now = loop.time()
            self._sweep(now)
            if now - self._last_reload >= RELOAD_EVERY:
                await self._reload()
                await self._load_denied()
            if now < due:
                continue
            due = now + self.renew_every
            await self._renew(list(self._held))
            await self._announce()
            await self._load_nodes()

    # --- Registry: writes ------------------------------------------------------------------

    async def claim(
        self, key: Hashable, *, kind: str, tunnel: str, holder: Holder, now: float
    ) -> Claim:
        reply = await self._call(
            "claim",
            [rl.REV_KEY, rl.lease_key(key)],
            [
                rl.key_text(key),
                holder.identity,
                tunnel,
                kind,
                holder.session,
                holder.node,
                holder.token or "",
                self.lease_ttl,
                self.grace,
            ],
        )
        if rl.text(reply[0]) != "ok":
            raise rl.claim_refusal(key, reply)
        kind, moved = rl.text(reply[1]), rl.text(reply[2])
        rev, redis_now, expires = int(rl.number(reply[3])), rl.number(reply[4]), rl.number(reply[5])
        record = rl.Record(
            key,
            holder.identity,
            tunnel,
            kind,
            holder.session,
            holder.node,
            holder.token,
            True,
            expires,
            self.grace,
            rev,
        )
        local = asyncio.get_running_loop().time()
        self.mirror.apply(record, redis_now, local)
        self._unconfirmed.pop(key, None)
        self._held[key] = _Held(kind, tunnel, holder)
        lease = self.mirror.table.get(key) or record.lease(redis_now, local)
        assert lease is not None
        return Claim(lease, moved if moved and moved != holder.session else None)

    def check_free(self, key: Hashable, identity: str, now: float) -> None:
        self.mirror.table.check_free(key, identity, now)

    async def release(self, session: str, now: float) -> list[Lease]:
        keys = [key for key, held in self._held.items() if held.holder.session == session]
        keys += [
            lease.port
            for lease in self.mirror.table.leases()
            if lease.session == session and lease.connected and lease.port not in keys
        ]
        for key in keys:
            self._held.pop(key, None)
        if not keys:
            return []
        if not self.available:
            self._pending_releases.append((session, keys))
            return self._release_locally(keys, asyncio.get_running_loop().time())
        try:
            return await self._release(session, keys)
        except TunnelError:
            self._pending_releases.append((session, keys))
            return self._release_locally(keys, asyncio.get_running_loop().time())

    async def _release(self, session: str, keys: list[Hashable]) -> list[Lease]:
        released: list[Lease] = []
        for start in range(0, len(keys), RENEW_BATCH):
            batch = keys[start : start + RENEW_BATCH]
            reply = await self._call(
                "release",
                [rl.REV_KEY, *(rl.lease_key(key) for key in batch)],
                [session, *(rl.key_text(key) for key in batch)],
            )
            redis_now = rl.number(reply[0])
            local = asyncio.get_running_loop().time()
            for text, rev_text, expires_text in reply[1]:
                key = rl.parse_key_text(rl.text(text))
                if key is None:
                    continue
                rev, expires = int(rl.number(rev_text)), rl.number(expires_text)
                old = self.mirror.table.get(key)
                if expires == 0:
                    self.mirror.remove(key, rev)
                    if old is not None:
                        old.connected = False
                        released.append(old)
                    continue
                if old is None:
                    continue
                record = rl.Record(
                    key,
                    old.owner,
                    old.key,
                    old.kind,
                    session,
                    old.node,
                    old.token,
                    False,
                    expires,
                    self.mirror.graces.get(key, self.grace),
                    rev,
                )
                self.mirror.apply(record, redis_now, local)
                lease = self.mirror.table.get(key)
                if lease is not None:
                    released.append(lease)
        return released

    def _release_locally(self, keys: list[Hashable], now: float) -> list[Lease]:
        """What the mirror says until Redis hears of it: the leases wait for their agents."""
        released = []
        for key in keys:
            lease = self.mirror.table.get(key)
            if lease is not None and lease.connected:
                lease.connected = False
                lease.expires = now + self.grace
                released.append(lease)
        return released

    async def drop(self, key: Hashable, session: str) -> Lease | None:
        lease = self.mirror.table.get(key)
        held = self._held.get(key)
        if held is not None and held.holder.session == session:
            del self._held[key]
        if lease is None or lease.session != session:
            return None
        if not self.available:
            self._pending_drops.append((key, session))
            self.mirror.table.pop(key)
            return lease
        try:
            rev = await self._drop(key, session)
        except TunnelError:
            self._pending_drops.append((key, session))
            self.mirror.table.pop(key)
            return lease
        if not rev:
            return None
        self.mirror.remove(key, int(rev))
        return lease

    async def _drop(self, key: Hashable, session: str) -> int:
        keys, args = [rl.REV_KEY, rl.lease_key(key)], [rl.key_text(key), session]
        return int(await self._call("drop", keys, args))

    async def renew(self, session: str, now: float) -> None:
        mine = [key for key, held in self._held.items() if held.holder.session == session]
        await self._renew(mine)

    async def expire(self, now: float) -> list[Lease]:
        return [old for _key, old, new in self.mirror.sweep(now) if new is None and old]

    # --- Registry: reads -------------------------------------------------------------------

    def resolve(self, key: Hashable) -> Lease | None:
        return self.mirror.table.get(key)

    get = resolve

    def find(self, identity: str, tunnel: str, now: float) -> Lease | None:
        for lease in self.mirror.table.leases():
            if (
                lease.owner == identity
                and lease.key == tunnel
                and (lease.connected or lease.expires > now)
            ):
                return lease
        return None

    def leases(self) -> list[Lease]:
        return self.mirror.table.leases()

    def nodes(self) -> Mapping[str, NodeInfo]:
        return self._nodes

    def held(self) -> list[Hashable]:
        """The keys this node's live sessions hold (what it renews)."""
        return list(self._held)

    # --- Redis calls ---------------------------------------------------------------------------

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run one script; Redis unreachable is a ``TunnelError`` the agent can act on."""
        if not self.available and not self._connecting():
            raise self._unavailable()
        assert self._scripts
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                return await self._scripts[script](
                    keys=keys, args=[self.clock_skew, self.channel, *args]
                )
        except _redis_errors() as exc:
            self._down(exc)
            raise self._unavailable() from None

    def _connecting(self) -> bool:
        """Whether the caller is the comeback itself (it runs before ``available`` is set)."""
        if self._runner is None:
            return not self._closing  # open()
        return asyncio.current_task() is self._runner

    def _unavailable(self) -> TunnelError:
        return RegistryUnavailable(
            f"registry unavailable: {self.down_reason or 'Redis does not answer'}; try again",
            "registry_unavailable",
        )

    async def _announce(self) -> None:
        """Write (or refresh) this node's record; refuse an id another live node uses."""
        node = self._node
        assert node is not None
        load = self._hooks.node_load() if self._hooks is not None else (0, 0, 0)
        reply = await self._scripts["node"](
            keys=[rl.REV_KEY, rl.node_key(self.node_id)],
            args=[
                self.clock_skew,
                self.channel,
                node.instance,
                node.address,
                NODE_TTL,
                *rl.node_fields(node, load),
            ],
        )
        if rl.text(reply[0]) == "taken":
            other = rl.text(reply[1])
            message = (
                f"node id {self.node_id!r} is in use by a live node at {other}; give this "
                "node another --node-id"
            )
            if not self.available and not self._nodes:
                raise ConfigError(message)
            log.error("%s", message)

    async def _flush_pending(self) -> None:
        releases, self._pending_releases = self._pending_releases, []
        drops, self._pending_drops = self._pending_drops, []
        for session, keys in releases:
            await self._release(session, keys)
        for key, session in drops:
            rev = await self._drop(key, session)
            if rev:
                self.mirror.remove(key, int(rev))

    async def _reassert(self, keys: list[Hashable] | None = None) -> None:
        """Claim again what this node's live sessions hold (Redis may have lost it, or let it
        lapse while it could not be reached); tell the relay of any taken meanwhile."""
        for key in list(self._held) if keys is None else keys:
            held = self._held.get(key)
            if held is None:
                continue
            try:
                await self.claim(
                    key, kind=held.kind, tunnel=held.tunnel, holder=held.holder, now=0.0
                )
            except TunnelError as exc:
                if exc.code == "registry_unavailable":
                    raise _Broken() from None
                self._held.pop(key, None)
                lease = self.mirror.table.get(key)
                log.warning("lost %s while the registry was away: %s", rl.key_text(key), exc)
                if self._hooks is not None:
                    self._hooks.lease_lost(
                        Lease(
                            key,
                            held.holder.identity,
                            held.tunnel,
                            kind=held.kind,
                            session=held.holder.session,
                            node=self.node_id,
                            token=held.holder.token,
                        )
                        if lease is None or lease.session == held.holder.session
                        else lease
                    )

    async def _renew(self, keys: list[Hashable]) -> None:
        lost: list[Hashable] = []
        for start in range(0, len(keys), RENEW_BATCH):
            batch = [key for key in keys[start : start + RENEW_BATCH] if key in self._held]
            if not batch:
                continue
            reply = await self._call(
                "renew",
                [rl.REV_KEY, *(rl.lease_key(key) for key in batch)],
                [self.lease_ttl, *(self._held[key].holder.session for key in batch)],
            )
            lost += [batch[int(position) - 1] for position in reply]
        if lost:
            await self._reassert(lost)

    async def _reload(self) -> None:
        """Load every lease at one instant; report what changed to the relay."""
        reply = await self._call("snapshot", [rl.REV_KEY], [rl.LEASE_PREFIX + "*"])
        redis_now, rev = rl.number(reply[0]), int(rl.number(reply[1]))
        records = []
        items = reply[2]
        for i in range(0, len(items) - 1, 2):
            name = rl.text(items[i])
            key = rl.parse_key_text(name.removeprefix(rl.LEASE_PREFIX))
            if key is None:
                continue
            try:
                records.append(rl.Record.parse(key, rl.pairs(items[i + 1])))
            except ValueError as exc:
                log.warning("ignoring lease %s in the registry: %s", name[:80], exc)
        loop = asyncio.get_running_loop()
        local = loop.time()
        self._last_reload = local
        keep = self._keep_unconfirmed(records, local)
        changes = self.mirror.load(records, rev, redis_now, local)
        for lease in keep:
            self.mirror.table.put(lease)
        kept = {lease.port for lease in keep}
        for key, old, new in changes:
            if key not in kept:
                self._changed(key, old, new)

    def _keep_unconfirmed(self, records: list[rl.Record], local: float) -> list[Lease]:
        """Held leases of other live nodes missing from a reload: kept a few seconds for their
        nodes to claim them again (a Redis that restarted empty), not dropped at once."""
        present = {record.key for record in records}
        for key in [key for key in self._unconfirmed if key in present]:
            del self._unconfirmed[key]
        keep = []
        for lease in self.mirror.table.leases():
            if lease.port in present or not lease.connected or lease.node == self.node_id:
                continue
            deadline = self._unconfirmed.setdefault(lease.port, local + UNCONFIRMED_FOR)
            if deadline > local:
                keep.append(lease)
        return keep

    async def _load_nodes(self) -> None:
        reply = await self._call("snapshot", [rl.REV_KEY], [rl.NODE_PREFIX + "*"])
        nodes: dict[str, NodeInfo] = {}
        items = reply[2]
        for i in range(0, len(items) - 1, 2):
            try:
                node = rl.parse_node(rl.pairs(items[i + 1]))
            except ValueError as exc:
                log.warning("ignoring node %s in the registry: %s", rl.text(items[i])[:80], exc)
                continue
            if node.id:
                nodes[node.id] = node
        self._nodes_stale = False
        local = asyncio.get_running_loop().time()
        held_by = {lease.node for lease in self.mirror.table.leases()}
        if any(node_id not in self._seen_at and node_id in held_by for node_id in nodes):
            self._last_reload = float("-inf")  # a node taken for gone is back: Redis's view
        for node_id in nodes:
            self._seen_at[node_id] = local
        live = self._live_nodes(local)
        for node_id, node in self._nodes.items():
            if node_id not in nodes and node_id in live:
                # Missing from this listing only (a Redis that came back empty, before the
                # node wrote its record again): its link, and the streams on it, stay up.
                nodes[node_id] = node
        if nodes != self._nodes:
            self._nodes = nodes
            if self._hooks is not None:
                self._hooks.nodes_changed(nodes)

    async def _load_denied(self) -> None:
        """Read the cluster's revoked token ids (bounded; anything but an id is ignored)."""
        from burrow.tokens import is_token_id

        assert self._client is not None
        self._denied_stale = False
        async with asyncio.timeout(OP_TIMEOUT):
            count = await self._client.scard(rl.DENY_KEY)
            if count > rl.MAX_DENIED:
                log.warning(
                    "the registry's %s holds %d ids; reading %d", rl.DENY_KEY, count, rl.MAX_DENIED
                )
                members = await self._client.srandmember(rl.DENY_KEY, rl.MAX_DENIED)
            else:
                members = await self._client.smembers(rl.DENY_KEY)
        ids = (m.decode("ascii", "replace") if isinstance(m, bytes) else str(m) for m in members)
        self.denied = frozenset(token_id for token_id in ids if is_token_id(token_id))

    # --- the mirror ------------------------------------------------------------------------

    def _on_message(self, data: object) -> None:
        message = rl.parse_message(data)
        if message is None:
            return
        op = message["op"]
        try:
            if op == "node":
                self._nodes_stale = True
                return
            if op == "deny":
                self._denied_stale = True
                return
            key = rl.parse_key_text(rl.text(message.get("key")))
            if key is None:
                raise ValueError("bad key")
            rev = int(rl.number(message.get("rev")))
            if op == "del":
                change = self.mirror.remove(key, rev)
            else:
                record = rl.Record.parse(key, message, rev)
                change = self.mirror.apply(
                    record, rl.number(message.get("now")), asyncio.get_running_loop().time()
                )
        except ValueError as exc:
            log.warning("ignoring a registry message: %s", exc)
            return
        if change is not None:
            self._unconfirmed.pop(key, None)
            self._changed(*change)

    def _sweep(self, now: float) -> None:
        live = self._live_nodes(now) if self.available else None
        for change in self.mirror.sweep(now, live, self.lease_ttl):
            self._changed(*change)
        for key, deadline in list(self._unconfirmed.items()):
            if deadline <= now:
                del self._unconfirmed[key]
                lease = self.mirror.table.get(key)
                if lease is not None and self.mirror.revs.get(key, 0) <= self.mirror.floor:
                    self.mirror.table.pop(key)
                    self._changed(key, lease, None)

    def _live_nodes(self, now: float) -> set[str]:
        """Nodes listed lately: one missing from the last listing or two (a Redis that came
        back empty, before every node wrote its record again) is not taken for dead yet."""
        for node_id, seen in list(self._seen_at.items()):
            if now - seen > NODE_GONE_AFTER:
                del self._seen_at[node_id]
        return {*self._seen_at, self.node_id}

    def _changed(self, key: Hashable, old: Lease | None, new: Lease | None) -> None:
        held = self._held.get(key)
        if held is not None and new is not None and new.session != held.holder.session:
            del self._held[key]  # another session took it (the same identity elsewhere)
        if self._hooks is not None:
            self._hooks.lease_changed(key, old, new)


class RegistryUnavailable(TunnelError):
    """Redis could not be reached for a claim (``registry_unavailable``)."""


class _Broken(Exception):
    """Redis stopped answering a call made outside the listen and tick loops."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {OP_TIMEOUT:.0f} s"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


async def revoke(url: str, token_id: str) -> None:
    """Add ``token_id`` to the cluster's revoked set in Redis and tell every node at once
    (``burrow token revoke --registry``); a ``ConfigError`` if Redis cannot be reached."""
    from burrow.tokens import check_token_id

    token_id = check_token_id(token_id)
    failures = _redis_errors()
    client = connect(url)
    try:
        async with asyncio.timeout(2 * OP_TIMEOUT):
            await client.sadd(rl.DENY_KEY, token_id)
            await client.publish(f"{rl.CHANNEL}:{database(url)}", '{"op":"deny"}')
    except failures as exc:
        raise ConfigError(
            f"cannot reach the registry {shown_url(url)}: {_reason(exc).rstrip('.')}; the "
            "token is not revoked there"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


def new_instance() -> tuple[str, float]:
    """A fresh instance id for this run of a node, and its start time."""
    return os.urandom(6).hex(), time.time()
