"""The relay's admin endpoint: ``GET /healthz`` for load balancers, ``GET /metrics`` for Prometheus.

The counters are plain numbers bumped on the event loop and turned into Prometheus families only
when scraped, so the data path pays an attribute add, not a lock. The HTTP side is a deliberately
tiny HTTP/1.1 reader (one request per connection, bounded head, bounded time) rather than a
framework, because it is exposed next to the relay and must not be a way to tie it up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, Literal, TypeVar

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from burrow.net.local_server import MAX_CONNECTIONS, LocalServer, linger

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_HEAD",
    "METRICS_CONTENT_TYPE",
    "READ_TIMEOUT",
    "AdminServer",
    "RelayMetrics",
]

log = logging.getLogger(__name__)

MAX_HEAD = 8 * 1024
"""Request line plus headers; a scrape or a health probe sends a few hundred bytes."""
MAX_HEADERS = 64
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
"""Concurrent admin connections; beyond this new ones are dropped so slow clients cannot pile up."""
MAX_LABEL_VALUES = 32
"""Distinct ``kind`` labels kept per metric; later ones are counted as "other" to cap series."""
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Direction = Literal["in", "out"]


class _Gauge:
    """A gauge with prometheus_client's inc/dec/set calls but no lock: a bump is one add."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class _Counter:
    """A counter with prometheus_client's inc call but no lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("a counter can only go up")
        self.value += amount


_T = TypeVar("_T", _Gauge, _Counter)


class _Family(Generic[_T]):
    """Children of a one-label metric, ``labels("tcp")`` or ``labels(kind="tcp")`` as in
    prometheus_client. Past MAX_LABEL_VALUES new values share an "other" child, so a caller
    labelling by error code cannot grow the scrape without bound."""

    __slots__ = ("_children", "_make", "label")

    def __init__(self, label: str, make: type[_T], values: tuple[str, ...] = ()) -> None:
        self.label = label
        self._make: type[_T] = make
        self._children: dict[str, _T] = {v: make() for v in values}

    def labels(self, *values: str, **by_name: str) -> _T:
        value = values[0] if len(values) == 1 and not by_name else by_name.get(self.label)
        if value is None or len(values) + len(by_name) != 1:
            raise ValueError(f"expected exactly one label value, for {self.label!r}")
        child = self._children.get(value)
        if child is None:
            if len(self._children) >= MAX_LABEL_VALUES:
                value = "other"
                child = self._children.get(value)
            if child is None:
                child = self._children[value] = self._make()
        return child

    def get(self, value: str) -> float:
        """Current value for a label value, 0 if never bumped (does not create a series)."""
        child = self._children.get(value)
        return 0 if child is None else child.value

    def items(self) -> list[tuple[str, float]]:
        return [(k, c.value) for k, c in self._children.items()]


class RelayMetrics:
    """The relay's counters and gauges, exposed through a private CollectorRegistry so several
    relays in one process (tests, embedded relays) never collide in the global one.

    Bump either through the attributes, which take prometheus_client's calls
    (``sessions.set(n)``, ``errors.labels(kind="auth").inc()``), or the helper methods. Both are
    unsynchronised adds meant for the event loop thread; values become Prometheus families only
    when scraped.
    """

    __slots__ = (
        "_bytes_in",
        "_bytes_out",
        "bytes",
        "errors",
        "node_links",
        "on_collect",
        "registry",
        "registry_up",
        "sessions",
        "streams",
        "streams_total",
        "tunnels",
    )

    def __init__(self) -> None:
        self.sessions = _Gauge()
        self.streams = _Gauge()
        self.streams_total = _Counter()
        self.bytes = _Family("direction", _Counter, ("in", "out"))
        self._bytes_in = self.bytes.labels("in")
        self._bytes_out = self.bytes.labels("out")
        self.errors = _Family("kind", _Counter)
        self.tunnels = _Family("kind", _Gauge)
        #: In a cluster only (None otherwise; see ``set_cluster``).
        self.registry_up: _Gauge | None = None
        self.node_links: _Family[_Gauge] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        #: Called before each render, so owners can fold in figures they keep elsewhere.
        self.on_collect: Callable[[], None] | None = None

    def session_opened(self) -> None:
        self.sessions.value += 1

    def session_closed(self) -> None:
        self.sessions.value -= 1

    def stream_opened(self) -> None:
        self.streams.value += 1
        self.streams_total.value += 1

    def stream_closed(self) -> None:
        self.streams.value -= 1

    def add_bytes(self, direction: Direction, n: int) -> None:
        """Count ``n`` bytes relayed; "in" is from the public client towards the agent."""
        (self._bytes_in if direction == "in" else self._bytes_out).value += n

    def error(self, kind: str) -> None:
        """Count one error of ``kind`` (e.g. "handshake", "protocol", a TunnelError code)."""
        self.errors.labels(kind).value += 1

    def tunnel_opened(self, kind: str) -> None:
        self.tunnels.labels(kind).value += 1

    def tunnel_closed(self, kind: str) -> None:
        self.tunnels.labels(kind).value -= 1

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of this relay's metrics."""
        if self.on_collect is not None:
            self.on_collect()
        return generate_latest(self.registry)

    def set_bytes(self, total_in: int, total_out: int) -> None:
        """Set the byte counters from totals kept by the data path (which never decrease)."""
        self._bytes_in.value = total_in
        self._bytes_out.value = total_out

    def set_cluster(self, registry_up: bool, links: dict[str, bool]) -> None:
        """A cluster node's state: the shared registry reachable, and each peer's link up."""
        if self.registry_up is None or self.node_links is None:
            self.registry_up = _Gauge()
            self.node_links = _Family("node", _Gauge)
        self.registry_up.value = 1 if registry_up else 0
        for node, up in links.items():
            self.node_links.labels(node).value = 1 if up else 0

    def _families(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "burrow_sessions", "Open agent sessions.", value=self.sessions.value
        )
        yield GaugeMetricFamily("burrow_streams_open", "Open streams.", value=self.streams.value)
        yield CounterMetricFamily(
            "burrow_streams_total", "Streams opened since start.", value=self.streams_total.value
        )
        relayed = CounterMetricFamily(
            "burrow_bytes_total", "Bytes relayed, by direction.", labels=["direction"]
        )
        for direction, n in self.bytes.items():
            relayed.add_metric([direction], n)
        yield relayed
        errors = CounterMetricFamily("burrow_errors_total", "Errors, by kind.", labels=["kind"])
        for kind, n in self.errors.items():
            errors.add_metric([kind], n)
        yield errors
        tunnels = GaugeMetricFamily("burrow_tunnels", "Open tunnels, by kind.", labels=["kind"])
        for kind, n in self.tunnels.items():
            tunnels.add_metric([kind], n)
        yield tunnels
        if self.registry_up is not None:
            yield GaugeMetricFamily(
                "burrow_registry_up",
                "Whether the shared registry (Redis) is reachable.",
                value=self.registry_up.value,
            )
        if self.node_links is not None:
            links = GaugeMetricFamily(
                "burrow_node_link_up", "Whether the link to a peer node is up.", labels=["node"]
            )
            for node, up in self.node_links.items():
                links.add_metric([node], up)
            yield links


class _Collector:
    """Adapter so the registry pulls from RelayMetrics at scrape time. It has no ``describe``,
    so the registry does not pre-register names (see RelayMetrics on why)."""

    def __init__(self, metrics: RelayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics._families()


# --- HTTP ----------------------------------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Closed(Exception):
    """The client went away before sending a whole request head."""


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """Read up to the blank line ending the head, refusing heads over MAX_HEAD bytes."""
    buf = bytearray()
    while True:
        chunk = await reader.read(MAX_HEAD + 4 - len(buf))
        if not chunk:
            raise _Closed
        start = max(0, len(buf) - 3)
        buf += chunk
        # RFC 9112 lets a recipient accept a bare LF as a line end; take the first blank line.
        ends = [i for i in (buf.find(b"\r\n\r\n", start), buf.find(b"\n\n", start)) if i >= 0]
        if ends:
            end = min(ends)
            if end > MAX_HEAD:
                raise _BadRequest(431)
            return bytes(buf[:end])
        if len(buf) >= MAX_HEAD + 4:
            raise _BadRequest(431)


def _parse_head(head: bytes) -> tuple[bytes, bytes, list[bytes]]:
    """(method, path, Host values) from a request head; headers are checked for shape only."""
    lines = head.split(b"\n")
    parts = lines[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
        raise _BadRequest(400)
    if len(lines) - 1 > MAX_HEADERS:
        raise _BadRequest(431)
    hosts: list[bytes] = []
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if b":" not in line or line[:1] in (b" ", b"\t"):
            raise _BadRequest(400)
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            hosts.append(value.strip())
    return parts[0], parts[1].partition(b"?")[0], hosts


def host_allowed(values: list[bytes], names: frozenset[str]) -> bool:
    """Whether a request's Host names this relay: an IP literal, ``localhost`` or one of
    ``names``. A DNS-rebinding page's own domain is none of those, so a browser tricked into
    asking cannot read what the relay serves."""
    if len(values) != 1:
        return False
    value = values[0].decode("latin-1").lower()
    if value.startswith("["):
        host = value[1 : value.find("]")] if "]" in value else ""
    else:
        host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    host = host.rstrip(".")
    if host == "localhost" or host in names:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AdminServer(LocalServer):
    name = "admin"

    """Serves /healthz and /metrics; one request per connection, always ``Connection: close``.

    ``health`` returns the /healthz JSON body; a "status" other than "ok" is served as 503 so a
    load balancer's plain status check takes the relay out of rotation.
    """

    def __init__(
        self,
        metrics: RelayMetrics,
        health: Callable[[], Mapping[str, Any]],
        hosts: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self._health = health
        self.hosts = frozenset(h.lower() for h in hosts)  # names the relay answers to

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await _read_head(reader)
            method, path, hosts = _parse_head(head)
            if not host_allowed(hosts, self.hosts):
                raise _BadRequest(403)
            status, ctype, body, extra = self._route(method, path)
        except _BadRequest as err:
            status, ctype, body, extra = err.status, "text/plain", b"", ()
        except TimeoutError:
            status, ctype, body, extra = 408, "text/plain", b"", ()
        except _Closed:
            return
        if not body:
            body = f"{_REASONS[status].lower()}\n".encode()
        await self._respond(writer, status, ctype, body, extra)
        if status in (400, 408, 431):
            await linger(reader, writer)
        writer.close()
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.wait_closed()  # returns once the response is flushed

    def _route(
        self, method: bytes, path: bytes
    ) -> tuple[int, str, bytes, tuple[tuple[str, str], ...]]:
        if path not in (b"/healthz", b"/metrics"):
            return 404, "text/plain", b"", ()
        if method != b"GET":
            return 405, "text/plain", b"", (("Allow", "GET"),)
        if path == b"/metrics":
            return 200, METRICS_CONTENT_TYPE, self.metrics.render(), ()
        try:
            report = dict(self._health())
            body = msgspec.json.encode(report) + b"\n"
        except Exception:
            log.exception("admin: health callback failed")
            return 500, "application/json", b'{"status":"error"}\n', ()
        status = 200 if report.get("status", "ok") == "ok" else 503
        return status, "application/json", body, ()

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        ctype: str,
        body: bytes,
        extra: tuple[tuple[str, str], ...],
    ) -> None:
        """Write a whole response; the caller closes the connection after it."""
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{k}: {v}" for k, v in extra),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
