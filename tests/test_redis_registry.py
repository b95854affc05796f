"""The Redis registry's Lua scripts apply the lease rules of ``LeaseTable`` (the same cases as
tests/test_leases.py), atomically, against a real Redis (database 15, emptied per test).

Redis's clock cannot be moved, so the scripts take a skew (seconds added to ``TIME``) that
these tests set to play "later", as test_leases.py passes ``now``. The mirror each node keeps
is checked too: it follows another node's changes by revision, and a reply and a message
that cross never put an older state back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable, Mapping
from typing import Any

import pytest

from burrow.errors import TunnelError
from burrow.roles import redis_leases as rl
from burrow.roles.leases import Lease
from burrow.roles.redis_registry import (
    LEASE_TTL,
    NODE_GONE_AFTER,
    RedisRegistry,
    database,
    shown_url,
)
from burrow.roles.registry import Holder, NodeInfo
from helpers import SCALE

redis = pytest.importorskip("redis")

URL = "redis://127.0.0.1:6379/15"
PORT = 5432
NAME = ("svc", "db")
GRACE = 30.0


class Hooks:
    """What a relay would be told; each change also wakes waiters."""

    def __init__(self) -> None:
        self.changes: list[tuple[Hashable, Lease | None, Lease | None]] = []
        self.lost: list[Lease] = []
        self.states: list[tuple[bool, str]] = []
        self.nodes: list[set[str]] = []
        self.changed = asyncio.Event()

    def lease_changed(self, key: Hashable, old: Lease | None, new: Lease | None) -> None:
        self.changes.append((key, old, new))
        self.changed.set()

    def lease_lost(self, lease: Lease) -> None:
        self.lost.append(lease)

    def nodes_changed(self, nodes: Mapping[str, NodeInfo]) -> None:
        self.nodes.append(set(nodes))

    def registry_state(self, available: bool, reason: str) -> None:
        self.states.append((available, reason))

    def node_load(self) -> tuple[int, int, int]:
        return (0, 0, 0)


def flush() -> None:
    client = redis.Redis.from_url(URL)
    try:
        client.flushdb()
    finally:
        client.close()


async def open_registry(node: str, *, grace: float = GRACE) -> tuple[RedisRegistry, Hooks]:
    registry = RedisRegistry(URL, grace=grace, node_id=node)
    hooks = Hooks()
    await registry.open(NodeInfo(node, f"127.0.0.1:{7000 + len(node)}"), hooks)
    return registry, hooks


@pytest.fixture
async def registry() -> AsyncIterator[RedisRegistry]:
    flush()
    reg, _ = await open_registry("n1")
    try:
        yield reg
    finally:
        await reg.close()


def alice(session: str = "s1") -> Holder:
    return Holder("alice", session, "n1")


def bob(session: str = "s9") -> Holder:
    return Holder("bob", session, "n1")


async def claim(reg: RedisRegistry, holder: Holder, key: Hashable = PORT, **kw: Any) -> Any:
    kind = kw.pop("kind", "tcp" if isinstance(key, int) else "private")
    return await reg.claim(key, kind=kind, tunnel=kw.pop("tunnel", "db"), holder=holder, now=0.0)


async def refused(reg: RedisRegistry, holder: Holder, key: Hashable = PORT, **kw: Any) -> str:
    with pytest.raises(TunnelError) as info:
        await claim(reg, holder, key, **kw)
    assert info.value.code == ("port_in_use" if isinstance(key, int) else "name_in_use")
    return str(info.value)


def now() -> float:
    return asyncio.get_running_loop().time()


# --- the rules (tests/test_leases.py's cases) ----------------------------------------------


async def test_free_key_is_free_for_anyone(registry: RedisRegistry) -> None:
    registry.check_free(PORT, "alice", now())
    assert registry.resolve(PORT) is None
    claimed = await claim(registry, alice())
    assert claimed.moved_from is None
    lease = registry.resolve(PORT)
    assert lease == Lease(PORT, "alice", "db", kind="tcp", session="s1", node="n1")
    assert claimed.lease == lease
    # Redis holds it as a hash whose TTL is the renewal period plus the grace.
    client = redis.Redis.from_url(URL)
    try:
        fields = client.hgetall(rl.lease_key(PORT))
        ttl = client.pttl(rl.lease_key(PORT))
    finally:
        client.close()
    assert fields[b"owner"] == b"alice" and fields[b"connected"] == b"1"
    assert 0 < ttl <= (LEASE_TTL + GRACE) * 1000


async def test_held_lease_refuses_others_while_renewed(registry: RedisRegistry) -> None:
    await claim(registry, alice())
    for skew in (0.0, LEASE_TTL - 1):
        registry.clock_skew = skew
        assert f"port {PORT} is in use by another agent" in await refused(registry, bob())
    with pytest.raises(TunnelError, match="in use by another agent"):
        registry.check_free(PORT, "bob", now() + 1e6)  # the mirror agrees
    # The owner may take it again (from another session: the lease moves there).
    again = await claim(registry, alice("s2"))
    assert again.moved_from == "s1" and again.lease.session == "s2"
    assert (await claim(registry, alice("s2"))).moved_from is None


async def test_released_lease_is_reserved_for_its_owner_during_the_grace(
    registry: RedisRegistry,
) -> None:
    await claim(registry, alice())
    released = await registry.release("s1", now())
    assert [lease.port for lease in released] == [PORT]
    lease = registry.resolve(PORT)
    assert lease is not None and not lease.connected
    assert GRACE - 1 < lease.expires - now() <= GRACE
    with pytest.raises(TunnelError, match="reserved for another agent"):
        registry.check_free(PORT, "bob", now())
    registry.check_free(PORT, "alice", now())
    registry.clock_skew = 10.0
    assert "reserved for another agent for 20 s more" in await refused(registry, bob())
    registry.clock_skew = GRACE - 1
    assert "reserved for another agent" in await refused(registry, bob())


async def test_released_lease_is_free_for_anyone_after_the_grace(registry: RedisRegistry) -> None:
    await claim(registry, alice())
    await registry.release("s1", now())
    registry.clock_skew = GRACE + 0.5
    taken = await claim(registry, bob(), tunnel="web")
    assert taken.lease.owner == "bob" and taken.lease.connected
    assert "in use by another agent" in await refused(registry, alice())
    assert registry.find("alice", "db", now()) is None
    assert registry.find("bob", "web", now()) is registry.resolve(PORT)


async def test_owner_reconnecting_within_the_grace_gets_a_live_lease_again(
    registry: RedisRegistry,
) -> None:
    await claim(registry, alice())
    await registry.release("s1", now())
    found = registry.find("alice", "db", now() + 10)
    assert found is not None and found.port == PORT
    registry.clock_skew = 10.0
    again = await claim(registry, alice("s2"))
    assert again.lease.connected and again.moved_from is None  # released: nobody to tell
    registry.clock_skew = GRACE + 100  # renewed leases do not lapse (within the renewal)
    await registry.renew("s2", now())
    await refused(registry, bob())


async def test_renewals_that_stop_keep_the_lease_for_its_identity_then_free_it(
    registry: RedisRegistry,
) -> None:
    """A node that dies stops renewing: its leases then wait ``grace`` for their identity
    (which may come back through another node), then are free."""
    await claim(registry, alice())
    registry.clock_skew = LEASE_TTL + 1
    assert "reserved for another agent" in await refused(registry, bob())
    assert (await claim(registry, alice("s2"))).lease.connected  # the identity, at once
    registry.clock_skew = 2 * LEASE_TTL + GRACE + 2
    assert (await claim(registry, bob())).lease.owner == "bob"


async def test_find_by_owner_and_tunnel(registry: RedisRegistry) -> None:
    await claim(registry, alice(), 5000, tunnel="db")
    await claim(registry, alice(), 5001, tunnel="web")
    await claim(registry, bob(), 5002, tunnel="db")
    t = now()
    assert registry.find("alice", "db", t) is registry.resolve(5000)
    assert registry.find("alice", "web", t) is registry.resolve(5001)
    assert registry.find("bob", "db", t) is registry.resolve(5002)
    assert registry.find("bob", "web", t) is None
    assert registry.find("carol", "db", t) is None


async def test_expire_returns_the_leases_it_forgets(registry: RedisRegistry) -> None:
    for port in (5000, 5001, 5002):
        await claim(registry, Holder(f"agent-{port}", f"s{port}", "n1"), port, tunnel="k")
    t = now()
    await registry.release("s5000", t)
    assert await registry.expire(t + GRACE - 1) == []
    assert registry.find("agent-5000", "k", t + GRACE + 1) is None  # lapsed: not found
    gone = await registry.expire(t + GRACE + 1)
    assert [lease.port for lease in gone] == [5000]
    assert await registry.expire(t + 1e9) == []
    assert registry.resolve(5000) is None and registry.resolve(5002) is not None


async def test_drop_frees_at_once_only_for_its_session(registry: RedisRegistry) -> None:
    await claim(registry, alice())
    assert await registry.drop(PORT, "s-other") is None  # not its session: nothing
    assert registry.resolve(PORT) is not None
    dropped = await registry.drop(PORT, "s1")
    assert dropped is not None and dropped.owner == "alice"
    assert registry.resolve(PORT) is None
    assert (await claim(registry, bob())).lease.owner == "bob"
    assert await registry.drop(PORT, "s1") is None  # dropping nothing is fine


async def test_no_grace_frees_at_release() -> None:
    flush()
    reg, _ = await open_registry("n1", grace=0.0)
    try:
        await claim(reg, alice())
        await refused(reg, bob())
        released = await reg.release("s1", now())
        assert [lease.port for lease in released] == [PORT]
        assert reg.resolve(PORT) is None
        assert (await claim(reg, bob())).lease.owner == "bob"
    finally:
        await reg.close()


async def test_release_of_an_unknown_session_is_a_no_op(registry: RedisRegistry) -> None:
    assert await registry.release("nobody", now()) == []
    await claim(registry, alice())
    assert await registry.release("nobody", now()) == []
    assert registry.resolve(PORT) is not None and registry.resolve(PORT).connected  # type: ignore[union-attr]


async def test_a_late_release_from_an_old_session_frees_nothing(registry: RedisRegistry) -> None:
    await claim(registry, alice("s1"))
    await claim(registry, alice("s2"))  # the agent came back on another session
    client = redis.Redis.from_url(URL)
    try:
        script = client.register_script(rl.RELEASE)
        reply = script(
            keys=[rl.REV_KEY, rl.lease_key(PORT)],
            args=[0, registry.channel, "s1", rl.key_text(PORT)],
        )
    finally:
        client.close()
    assert reply[1] == []  # s1 holds nothing now
    assert await registry.drop(PORT, "s1") is None
    lease = registry.resolve(PORT)
    assert lease is not None and lease.connected and lease.session == "s2"


async def test_leases_are_per_key(registry: RedisRegistry) -> None:
    await claim(registry, alice(), 5000)
    await claim(registry, bob(), 5001)
    await refused(registry, bob(), 5000)
    await refused(registry, alice(), 5001)
    await claim(registry, alice(), NAME)  # a name and a port never collide
    await refused(registry, bob(), NAME)


async def test_a_name_held_by_another_kind_is_name_in_use(registry: RedisRegistry) -> None:
    await claim(registry, alice(), NAME, kind="private")
    message = await refused(registry, alice("s2"), NAME, kind="exit")  # even its own identity
    assert message == "name 'db' is in use by a private service"
    assert "in use by another agent" in await refused(registry, bob(), NAME, kind="exit")
    await registry.release("s1", now())
    registry.clock_skew = GRACE + 1
    assert (await claim(registry, bob(), NAME, kind="exit")).lease.kind == "exit"


# --- several nodes ----------------------------------------------------------------------------


async def wait_until(hooks: Hooks, check: Any) -> None:
    async with asyncio.timeout(10 * SCALE):
        while not check():
            hooks.changed.clear()
            await hooks.changed.wait()


async def test_another_nodes_mirror_follows_claims_releases_and_drops() -> None:
    flush()
    one, _ = await open_registry("n1")
    two, hooks = await open_registry("n2")
    try:
        await claim(one, alice())
        await wait_until(hooks, lambda: two.resolve(PORT) is not None)
        assert two.resolve(PORT) == one.resolve(PORT)
        with pytest.raises(TunnelError, match="in use by another agent"):
            two.check_free(PORT, "bob", now())
        await refused(two, Holder("bob", "s9", "n2"))  # the other node is refused too
        await one.release("s1", now())
        await wait_until(hooks, lambda: not two.resolve(PORT).connected)  # type: ignore[union-attr]
        assert two.find("alice", "db", now()) is not None
        # The same identity through the other node takes it at once; n1 is told.
        moved = await claim(two, Holder("alice", "s5", "n2"))
        assert moved.lease.node == "n2"
        await one.drop(PORT, "s1")  # late: frees nothing
        await two.drop(PORT, "s5")
        await wait_until(hooks, lambda: two.resolve(PORT) is None)
        assert hooks.changes[0][1] is None and hooks.changes[0][2] is not None
    finally:
        await one.close()
        await two.close()


async def test_racing_claims_from_two_nodes_have_one_winner_each_time() -> None:
    flush()
    one, _ = await open_registry("n1")
    two, _ = await open_registry("n2")
    try:
        for race in range(50):
            key = ("svc", f"race-{race}")
            outcomes = await asyncio.gather(
                claim(one, Holder("alice", "sa", "n1"), key),
                claim(two, Holder("bob", "sb", "n2"), key),
                return_exceptions=True,
            )
            winners = [o for o in outcomes if not isinstance(o, BaseException)]
            losers = [o for o in outcomes if isinstance(o, TunnelError)]
            assert len(winners) == 1 and len(losers) == 1, outcomes
            assert losers[0].code == "name_in_use"
    finally:
        await one.close()
        await two.close()


async def test_a_node_id_in_use_at_another_address_is_refused() -> None:
    from burrow.errors import ConfigError

    flush()
    one, _ = await open_registry("n1")
    try:
        other = RedisRegistry(URL, grace=GRACE, node_id="n1")
        with pytest.raises(ConfigError, match="node id 'n1' is in use by a live node at"):
            await other.open(NodeInfo("n1", "127.0.0.9:1", instance="x"), Hooks())
    finally:
        await one.close()


async def test_after_redis_lost_everything_other_nodes_leases_wait_to_be_claimed_again() -> None:
    """A Redis restarted without persistence is empty: a node that reloads before the
    holder has claimed its leases again keeps them a few seconds (routes stay up), takes the
    holder's claim when it comes, and forgets what nobody claims."""
    flush()
    one, _ = await open_registry("n1")
    two, hooks = await open_registry("n2")
    try:
        await claim(one, alice(), PORT)
        await claim(one, alice(), 5433, tunnel="other")
        await wait_until(hooks, lambda: two.resolve(5433) is not None)
        flush()  # what a restart of a Redis that keeps nothing leaves
        await one.drop(5433, "s1")  # gone from Redis, and nobody will claim it again
        hooks.changes.clear()
        await two._reload()  # node 2 came back first (the steps of its comeback, by hand)
        assert two.resolve(PORT) is not None and two.resolve(5433) is not None
        assert hooks.changes == []  # nothing reported gone: its listeners stay
        await one._reassert()  # node 1 came back: it claims what its sessions hold
        await wait_until(hooks, lambda: any(key == PORT for key, _, _ in hooks.changes))
        lease = two.resolve(PORT)
        assert lease is not None and lease.connected and lease.session == "s1"
        two._sweep(now() + 60)  # long after: what nobody claimed again is gone
        assert two.resolve(5433) is None and two.resolve(PORT) is not None
    finally:
        await one.close()
        await two.close()


async def test_after_redis_lost_everything_a_node_not_listed_yet_keeps_its_link() -> None:
    """A node that lists the cluster before the others wrote their records again (a Redis
    that came back empty) keeps them, so its links and the streams on them stay up; a node
    missing for long is let go."""
    flush()
    one, _ = await open_registry("n1")
    two, hooks = await open_registry("n2")
    try:
        await two._load_nodes()
        assert hooks.nodes and "n1" in hooks.nodes[-1]
        told = len(hooks.nodes)
        flush()  # what a restart of a Redis that keeps nothing leaves
        await two._load_nodes()  # node 2 came back first
        assert len(hooks.nodes) == told  # nobody was dropped: no link closed
        two._seen_at["n1"] -= NODE_GONE_AFTER + 1  # long after, n1 never wrote its record again
        await two._load_nodes()
        assert "n1" not in hooks.nodes[-1]
    finally:
        await one.close()
        await two.close()


def test_the_mirror_applies_only_newer_revisions() -> None:
    """A claim's reply and the channel's message of an older change can cross."""
    mirror = rl.Mirror()

    def record(rev: int, session: str, connected: bool = True) -> rl.Record:
        return rl.Record(
            PORT, "alice", "db", "tcp", session, "n1", None, connected, 115.0, GRACE, rev
        )

    assert mirror.apply(record(5, "s2"), 100.0, 0.0) is not None
    assert mirror.apply(record(4, "s1"), 100.0, 0.0) is None  # older: ignored
    assert mirror.table.get(PORT).session == "s2"  # type: ignore[union-attr]
    assert mirror.remove(PORT, 3) is None
    change = mirror.apply(record(6, "s2", connected=False), 100.0, 50.0)
    assert change is not None and change[2] is not None
    assert change[2].expires == 50.0 + 15.0  # Redis's 115 at Redis's 100, in the local clock
    # A load replaces everything; anything at or below its revision is already in it.
    changes = mirror.load([record(9, "s3")], 9, 100.0, 0.0)
    assert [(c[1].session, c[2].session) for c in changes] == [("s2", "s3")]  # type: ignore[union-attr]
    assert mirror.apply(record(8, "s4"), 100.0, 0.0) is None
    assert mirror.remove(PORT, 10) is not None and mirror.table.get(PORT) is None


def test_a_lease_whose_renewals_ran_out_reads_as_waiting() -> None:
    lapsed = rl.Record(PORT, "alice", "db", "tcp", "s1", "n1", None, True, 100.0, GRACE, 1)
    lease = lapsed.lease(redis_now=110.0, local_now=1000.0)
    assert lease is not None and not lease.connected and lease.expires == 1000.0 + 20.0
    assert lapsed.lease(redis_now=100.0 + GRACE, local_now=0.0) is None


def test_keys_and_urls() -> None:
    for key in (20001, ("http", "web"), ("svc", "db-1")):
        assert rl.parse_key_text(rl.key_text(key)) == key
    for bad in ("port:0", "port:70000", "port:x", "HTTP:web", "svc:", "svc:a b", ":x"):
        assert rl.parse_key_text(bad) is None
    assert database("redis://h:6379/15") == 15 and database("redis://h") == 0
    assert database("unix:///run/redis.sock?db=3") == 3
    assert shown_url("redis://u:secret@h:6379/1") == "redis://u:***@h:6379/1"


# --- the cluster's revoked tokens -------------------------------------------------------------


async def test_revoked_ids_are_read_at_open_and_followed_on_the_channel() -> None:
    """The set holds ids only as far as nodes are concerned (anything else is ignored), a node
    opened later reads it, and a revocation reaches a running node through the channel."""
    from burrow.roles.redis_registry import revoke

    flush()
    client = redis.Redis.from_url(URL)
    try:
        client.sadd(rl.DENY_KEY, "aaaaaaaaaaaa", "not an id", "x" * 4000, "AAAAAAAAAAAA")
    finally:
        client.close()
    first, _ = await open_registry("n1")
    try:
        assert first.denied == frozenset({"aaaaaaaaaaaa"})
        await revoke(URL, " 0123456789ab\n")
        async with asyncio.timeout(5 * SCALE):
            while "0123456789ab" not in first.denied:
                await asyncio.sleep(0.02)
        later, _ = await open_registry("n2")
        try:
            assert later.denied == frozenset({"aaaaaaaaaaaa", "0123456789ab"})
        finally:
            await later.close()
    finally:
        await first.close()
