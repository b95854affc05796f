"""Leases as Redis holds them, without Redis: key names, the Lua scripts that apply the lease
rules atomically, and the mirror a node keeps of every lease (sans-I/O: bytes and numbers in,
leases and changes out).

Each lease is a hash ``burrow:lease:<key>`` (``port:20001``, ``http:web``, ``svc:db``) with its
owner identity, tunnel key, kind, session, node, token, ``connected``, ``expires`` and
``grace``. A held lease's ``expires`` is when its node's renewals run out; once they do, the
lease is kept ``grace`` seconds more for its identity, as a released one is. The key's TTL
ends with the lease, so Redis forgets it without anyone's help. Every change takes a number
from ``burrow:rev`` and is PUBLISHed on ``burrow:events:<db>``: a node's mirror applies a
change only if its number is newer than what it has, so a reply, a message and a reload can
cross.

The scripts read Redis's own clock (``TIME``), never a node's: nodes' clocks may disagree, and
the mirror converts Redis's times to the node's monotonic clock by the difference.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from burrow.errors import TunnelError
from burrow.roles.leases import Lease, LeaseTable, in_use, reserved
from burrow.roles.registry import NodeInfo, kind_conflict

log = logging.getLogger("burrow.registry")

PREFIX = "burrow:"
REV_KEY = PREFIX + "rev"
CHANNEL = PREFIX + "events"  # + ":<database>" (pub/sub spans a Redis's databases)
LEASE_PREFIX = PREFIX + "lease:"
NODE_PREFIX = PREFIX + "node:"
DENY_KEY = PREFIX + "deny"  # a set of revoked token ids, for every node of the cluster
MAX_DENIED = 100_000  # ids read from it at most (a revocation list, not a token store)

#: Bounds on what is read back from Redis (a shared service: its data is checked as input).
MAX_MESSAGE = 16 * 1024
MAX_FIELD = 512
_NAMESPACE = re.compile(r"[a-z]{1,16}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_PORT = re.compile(r"[0-9]{1,5}")
_LEASE_FIELDS = ("owner", "tunnel", "kind", "session", "node", "token")
_NODE_NUMBERS = ("sessions", "tunnels", "streams")


# --- keys ----------------------------------------------------------------------------------


def key_text(key: Hashable) -> str:
    """``port:20001`` for a port, ``NAMESPACE:NAME`` for a name."""
    if isinstance(key, tuple) and len(key) == 2:
        return f"{key[0]}:{key[1]}"
    if isinstance(key, int):
        return f"port:{key}"
    raise ValueError(f"not a lease key: {key!r}")


def parse_key_text(text: str) -> Hashable | None:
    """The lease key of ``key_text``'s output; None if it is not one."""
    namespace, _, rest = text.partition(":")
    if namespace == "port":
        if _PORT.fullmatch(rest) and 1 <= int(rest) <= 65535:
            return int(rest)
        return None
    if _NAMESPACE.fullmatch(namespace) and _NAME.fullmatch(rest):
        return (namespace, rest)
    return None


def lease_key(key: Hashable) -> str:
    return LEASE_PREFIX + key_text(key)


def node_key(node_id: str) -> str:
    return NODE_PREFIX + node_id


# --- scripts -------------------------------------------------------------------------------
# Every script: KEYS[1] is the revision counter, ARGV[1] a clock skew (seconds added to TIME:
# 0 except in tests, which play with time as tests/test_leases.py does), ARGV[2] the channel.

_PRELUDE = """
local function fmt(x) return string.format('%.6f', x) end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
end
local FIELDS = {'owner', 'tunnel', 'kind', 'session', 'node', 'token', 'connected',
                'expires', 'grace'}
local function state(key)
  local v = redis.call('HMGET', key, unpack(FIELDS))
  if not v[1] then return nil end
  return {owner = v[1], tunnel = v[2] or '', kind = v[3] or '', session = v[4] or '',
          node = v[5] or '', token = v[6] or '', connected = v[7] == '1',
          expires = tonumber(v[8]) or 0, grace = tonumber(v[9]) or 0}
end
-- When a lease stops binding anyone: a held one when its node's renewals and then its grace
-- run out; a released one at the end of its grace.
local function lapses(s)
  if s.connected then return s.expires + s.grace end
  return s.expires
end
local function write(key, s, now, rev)
  redis.call('HSET', key, 'owner', s.owner, 'tunnel', s.tunnel, 'kind', s.kind,
             'session', s.session, 'node', s.node, 'token', s.token,
             'connected', s.connected and '1' or '0', 'expires', fmt(s.expires),
             'grace', fmt(s.grace), 'rev', rev)
  redis.call('PEXPIRE', key, math.max(1, math.ceil((lapses(s) - now) * 1000)))
end
local function announce(s, text, rev, now)
  redis.call('PUBLISH', ARGV[2], cjson.encode({
    op = 'set', key = text, rev = rev, now = fmt(now), owner = s.owner, tunnel = s.tunnel,
    kind = s.kind, session = s.session, node = s.node, token = s.token,
    connected = s.connected and '1' or '0', expires = fmt(s.expires), grace = fmt(s.grace)}))
end
local function gone(text, rev)
  redis.call('PUBLISH', ARGV[2], cjson.encode({op = 'del', key = text, rev = rev}))
end
"""

#: KEYS: rev, lease. ARGV: skew, channel, key text, owner, tunnel, kind, session, node, token,
#: ttl, grace. The rules of ``LeaseTable.check_free`` plus the relay's kind check.
CLAIM = (
    _PRELUDE
    + """
local now = clock()
local s = state(KEYS[2])
local kind = ARGV[6]
local moved = ''
if s and lapses(s) > now then
  if s.owner ~= ARGV[4] then
    if s.connected and s.expires > now then return {'in_use', s.kind, '0'} end
    return {'reserved', s.kind, fmt(lapses(s) - now)}
  end
  if s.kind ~= '' and kind ~= '' and s.kind ~= kind then return {'other_kind', s.kind, '0'} end
end
if s then
  if kind == '' then kind = s.kind end
  if s.connected and s.session ~= ARGV[7] then moved = s.session end
end
local new = {owner = ARGV[4], tunnel = ARGV[5], kind = kind, session = ARGV[7],
             node = ARGV[8], token = ARGV[9], connected = true,
             expires = now + tonumber(ARGV[10]), grace = tonumber(ARGV[11])}
local rev = redis.call('INCR', KEYS[1])
write(KEYS[2], new, now, rev)
announce(new, ARGV[3], rev, now)
return {'ok', kind, moved, tostring(rev), fmt(now), fmt(new.expires)}
"""
)

#: KEYS: rev, leases... ARGV: skew, channel, session, key texts... Only the session's own
#: held leases: each waits ``grace`` for its identity (or goes at once with no grace).
RELEASE = (
    _PRELUDE
    + """
local now = clock()
local out = {}
for i = 2, #KEYS do
  local s = state(KEYS[i])
  if s and s.session == ARGV[3] and s.connected then
    local rev = redis.call('INCR', KEYS[1])
    if s.grace <= 0 then
      redis.call('DEL', KEYS[i])
      gone(ARGV[i + 2], rev)
      out[#out + 1] = {ARGV[i + 2], tostring(rev), '0'}
    else
      s.connected = false
      s.expires = now + s.grace
      write(KEYS[i], s, now, rev)
      announce(s, ARGV[i + 2], rev, now)
      out[#out + 1] = {ARGV[i + 2], tostring(rev), fmt(s.expires)}
    end
  end
end
return {fmt(now), out}
"""
)

#: KEYS: rev, lease. ARGV: skew, channel, key text, session. Free the key now, if the session
#: holds it (a late drop from an old session frees nothing).
DROP = (
    _PRELUDE
    + """
local s = state(KEYS[2])
if not s or s.session ~= ARGV[4] then return 0 end
local rev = redis.call('INCR', KEYS[1])
redis.call('DEL', KEYS[2])
gone(ARGV[3], rev)
return rev
"""
)

#: KEYS: rev, leases... ARGV: skew, channel, ttl, sessions... (one per lease). Push back the
#: end of each held lease of its session; return the positions (1-based) not renewed.
RENEW = (
    _PRELUDE
    + """
local now = clock()
local lost = {}
for i = 2, #KEYS do
  local s = state(KEYS[i])
  if s and s.connected and s.session == ARGV[i + 2] then
    s.expires = now + tonumber(ARGV[3])
    redis.call('HSET', KEYS[i], 'expires', fmt(s.expires))
    redis.call('PEXPIRE', KEYS[i], math.max(1, math.ceil((lapses(s) - now) * 1000)))
  else
    lost[#lost + 1] = i - 1
  end
end
return lost
"""
)

#: KEYS: rev. ARGV: skew, channel, pattern. Every hash matching the pattern, the revision and
#: the time, read at one instant (a mirror loads this, then applies newer messages).
SNAPSHOT = (
    _PRELUDE
    + """
local now = clock()
local rev = redis.call('GET', KEYS[1]) or '0'
local keys = redis.call('KEYS', ARGV[3])
local out = {}
for _, k in ipairs(keys) do
  out[#out + 1] = k
  out[#out + 1] = redis.call('HGETALL', k)
end
return {fmt(now), rev, out}
"""
)

#: KEYS: rev, node. ARGV: skew, channel, instance, address, ttl, field, value, ... A node's
#: record, refreshed while it lives; refused while another live instance with another
#: address has the id (a restart on the same address takes it over at once).
NODE = (
    _PRELUDE
    + """
local now = clock()
local held = redis.call('HMGET', KEYS[2], 'instance', 'address')
if held[1] and held[1] ~= ARGV[3] and held[2] ~= ARGV[4] then
  return {'taken', held[2]}
end
local fields = {'instance', ARGV[3], 'address', ARGV[4], 'seen', fmt(now)}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[5]) * 1000))
if not held[1] then
  redis.call('PUBLISH', ARGV[2], cjson.encode({op = 'node', id = string.sub(KEYS[2], 13)}))
end
return {'ok', fmt(now)}
"""
)


# --- decoding what Redis says --------------------------------------------------------------


def text(value: object) -> str:
    """A string from Redis (bytes) or JSON, bounded; ``ValueError`` otherwise."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or len(value) > MAX_FIELD:
        raise ValueError(f"bad field {value!r:.40}")
    return value


def number(value: object) -> float:
    """A finite number from Redis (bytes), a JSON number or a string; ``ValueError`` otherwise."""
    if isinstance(value, bool):
        raise ValueError("not a number")
    result = float(value) if isinstance(value, int | float) else float(text(value))
    if result != result or result in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return result


def pairs(items: object) -> dict[str, object]:
    """HGETALL's flat list (or a dict) as a dict of text keys."""
    if isinstance(items, dict):
        return {text(k): v for k, v in items.items()}
    if not isinstance(items, list) or len(items) % 2 or len(items) > 64:
        raise ValueError("not a hash")
    return {text(items[i]): items[i + 1] for i in range(0, len(items), 2)}


@dataclass(slots=True)
class Record:
    """One lease as Redis holds it, its times in Redis's clock."""

    key: Hashable
    owner: str
    tunnel: str
    kind: str
    session: str
    node: str
    token: str | None
    connected: bool
    expires: float
    grace: float
    rev: int

    @classmethod
    def parse(cls, key: Hashable, fields: Mapping[str, object], rev: int | None = None) -> Record:
        owner, tunnel, kind, session, node, token = (text(fields.get(f, "")) for f in _LEASE_FIELDS)
        if not owner:
            raise ValueError("a lease with no owner")
        return cls(
            key=key,
            owner=owner,
            tunnel=tunnel,
            kind=kind,
            session=session,
            node=node,
            token=token or None,
            connected=text(fields.get("connected", "0")) == "1",
            expires=number(fields.get("expires", "0")),
            grace=number(fields.get("grace", "0")),
            rev=int(number(fields.get("rev", 0))) if rev is None else rev,
        )

    def lapses(self) -> float:
        return self.expires + self.grace if self.connected else self.expires

    def lease(self, redis_now: float, local_now: float) -> Lease | None:
        """The mirror's lease (times in the node's clock), or None if it has lapsed.

        A held lease whose renewals ran out (its node died) reads as released then."""
        if self.lapses() <= redis_now:
            return None
        connected = self.connected and self.expires > redis_now
        expires = 0.0 if connected else local_now + (self.lapses() - redis_now)
        return Lease(
            self.key,
            self.owner,
            self.tunnel,
            connected=connected,
            expires=expires,
            kind=self.kind,
            session=self.session,
            node=self.node,
            token=self.token,
        )


def claim_refusal(key: Hashable, reply: list[object]) -> TunnelError:
    """The error for a refused claim, worded as the one-node relay words it."""
    verdict, kind, extra = (text(x) for x in reply[:3])
    if verdict == "in_use":
        return in_use(key)
    if verdict == "reserved":
        return reserved(key, number(extra))
    if verdict == "other_kind":
        conflict = kind_conflict(key, kind, "?")
        assert conflict is not None
        return conflict
    return TunnelError(f"the registry refused {key_text(key)}: {verdict}", "registry_error")


def parse_message(data: object) -> dict[str, object] | None:
    """A message from the channel, or None (logged) if it is not one of ours."""
    try:
        raw = data if isinstance(data, bytes | str) else b""
        if len(raw) > MAX_MESSAGE:
            raise ValueError("too long")
        message = json.loads(raw)
        if not isinstance(message, dict) or message.get("op") not in ("set", "del", "node", "deny"):
            raise ValueError("unknown message")
        return message
    except ValueError as exc:
        log.warning("ignoring a registry message: %s", exc)
        return None


def parse_node(fields: Mapping[str, object]) -> NodeInfo:
    """A node's record (``burrow:node:<id>``)."""
    numbers = {name: int(number(fields.get(name, 0))) for name in _NODE_NUMBERS}
    fingerprint = text(fields.get("fingerprint", ""))
    return NodeInfo(
        id=text(fields.get("id", "")),
        address=text(fields.get("address", "")),
        fingerprint=fingerprint or None,
        seen=number(fields.get("seen", 0)),
        started=number(fields.get("started", 0)),
        version=text(fields.get("version", "")),
        instance=text(fields.get("instance", "")),
        **numbers,
    )


def node_fields(node: NodeInfo, load: tuple[int, int, int]) -> list[str]:
    """The field/value pairs a node writes for itself (address and instance apart)."""
    sessions, tunnels, streams = load
    return [
        "id",
        node.id,
        "fingerprint",
        node.fingerprint or "",
        "started",
        f"{node.started:.3f}",
        "version",
        node.version,
        "sessions",
        str(sessions),
        "tunnels",
        str(tunnels),
        "streams",
        str(streams),
    ]


# --- the mirror ----------------------------------------------------------------------------

#: A change the mirror made: (key, old lease, new lease); new None means gone.
Change = tuple[Hashable, Lease | None, Lease | None]


@dataclass
class Mirror:
    """Every lease of the cluster as this node last heard of it, in its own clock. Changes are
    applied by revision: an older one (a message that crossed a reply) changes nothing."""

    table: LeaseTable = field(default_factory=lambda: LeaseTable(0.0))
    revs: dict[Hashable, int] = field(default_factory=dict)  # deleted keys too, until a load
    graces: dict[Hashable, float] = field(default_factory=dict)
    floor: int = 0  # the revision of the last load: anything at or below it is in it

    def apply(self, record: Record, redis_now: float, local_now: float) -> Change | None:
        """A lease written (claimed, released): store it if it is newer than ours."""
        if not self._newer(record.key, record.rev):
            return None
        self.graces[record.key] = record.grace
        new = record.lease(redis_now, local_now)
        old = self.table.put(new) if new is not None else self.table.pop(record.key)
        return (record.key, old, new) if old is not None or new is not None else None

    def remove(self, key: Hashable, rev: int) -> Change | None:
        """A lease deleted (dropped, or released with no grace)."""
        if not self._newer(key, rev):
            return None
        old = self.table.pop(key)
        return (key, old, None) if old is not None else None

    def load(
        self, records: Iterable[Record], rev: int, redis_now: float, local_now: float
    ) -> list[Change]:
        """Replace everything with a snapshot taken at revision ``rev``."""
        fresh: dict[Hashable, Lease] = {}
        for record in records:
            lease = record.lease(redis_now, local_now)
            if lease is not None:
                fresh[record.key] = lease
        changes: list[Change] = [
            (old.port, old, None) for old in self.table.leases() if old.port not in fresh
        ]
        for key, lease in fresh.items():
            previous = self.table.get(key)
            if previous != lease:
                changes.append((key, previous, lease))
        self.table.clear()
        for lease in fresh.values():
            self.table.put(lease)
        self.revs = {record.key: record.rev for record in records}
        self.graces = {record.key: record.grace for record in records}
        self.floor = rev
        return changes

    def sweep(
        self, local_now: float, live_nodes: Iterable[str] | None = None, ttl: float = 0.0
    ) -> list[Change]:
        """Forget released leases whose grace is over. A held lease of a node that is gone
        reads as released, its grace counted from when its renewals run out at the latest
        (``ttl`` from now); the next load puts Redis's own times on it."""
        changes: list[Change] = []
        live = set(live_nodes) if live_nodes is not None else None
        for lease in self.table.leases():
            if lease.connected and live is not None and lease.node not in live:
                grace = self.graces.get(lease.port, 0.0)
                lapsed = replace(lease, connected=False, expires=local_now + ttl + grace)
                self.table.put(lapsed)
                changes.append((lease.port, lease, lapsed))
            elif not lease.connected and lease.expires <= local_now:
                self.table.pop(lease.port)
                changes.append((lease.port, lease, None))
        return changes

    def _newer(self, key: Hashable, rev: int) -> bool:
        if rev <= self.floor or rev <= self.revs.get(key, 0):
            return False
        self.revs[key] = rev
        return True
