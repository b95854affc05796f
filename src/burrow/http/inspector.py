"""The agent's local web inspector (``burrow http`` serves it on http://127.0.0.1:4040, like
ngrok's): every proxied request, live, with headers, bodies and a Replay button.

Everything it shows was sent by visitors from the internet, so it is treated as hostile: the page
only ever puts it into the DOM as text, and serves itself with a Content-Security-Policy that
allows nothing but its own inline script and style (by hash). The server rejects Host headers
that are not loopback or the bound address, because a DNS-rebinding page could otherwise read
every request through the user's browser, and rejects cross-site POSTs, because replay re-sends
a request to the local service and must not be something any web page can trigger.

The HTTP side is a small HTTP/1.1 server over asyncio streams, with h11 parsing the request: one
request per connection (``Connection: close``), bounded head, body and time, and a bounded
number of connections and event streams, so the inspector cannot be used to tie up the agent.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import errno
import hashlib
import http
import ipaddress
import json
import logging
import re
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11

from burrow.errors import BurrowError
from burrow.http.inspector_page import PAGE, SCRIPT, STYLE
from burrow.http.record import Exchange
from burrow.net.local_server import LocalServer, linger

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PORT",
    "MAX_BODY",
    "MAX_HEAD",
    "ExchangeStore",
    "Inspector",
    "InspectorBindError",
    "describe_body",
    "detail",
    "summary",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 4040
DEFAULT_LIMIT = 500
"""Exchanges kept by default; the oldest go first."""
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
"""Body bytes kept across all exchanges. Each body is capped at BODY_CAP (1 MiB), so 500 full
exchanges could hold 1 GiB; this second bound keeps the agent's memory reasonable regardless."""
MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
"""Request body the inspector accepts (replay needs none; this only bounds what a client sends)."""
READ_TIMEOUT = 10.0
"""Time for a whole request (head and body) to arrive."""
WRITE_TIMEOUT = 10.0
"""Time for one write to drain; an event-stream reader that stops reading is dropped after it."""
REPLAY_TIMEOUT = 60.0
MAX_STREAMS = 16
"""Concurrent /api/events streams (each open inspector tab holds one)."""
MAX_REPLAYS = 8
"""Concurrent replays; more get 429, so a stuck local service cannot pile them up."""
KEEPALIVE = 15.0
"""Seconds between SSE comments on an idle stream, so proxies and browsers keep it open."""
FEED_LIMIT = 1000
"""Events queued for one stream; a subscriber further behind is dropped and its EventSource
reconnects and reloads the list, which is cheaper than buffering without bound."""
HEX_PREVIEW = 256
_ID = re.compile(r"/api/requests/([A-Za-z0-9_.~-]{1,128})(/replay)?")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")


class InspectorBindError(BurrowError):
    """The inspector could not listen on its address (usually: the port is taken).

    ``in_use`` tells a caller that it may retry with port 0 to get any free port."""

    def __init__(self, message: str, *, in_use: bool = False) -> None:
        super().__init__(message)
        self.in_use = in_use


# --- the store -------------------------------------------------------------------------------

Listener = Callable[[str, Exchange | None], None]
"""Called with ("begin" | "end" | "evict", exchange) or ("clear", None)."""


class ExchangeStore:
    """The last ``limit`` exchanges in arrival order; implements ``burrow.http.record.Recorder``.

    Exchanges are kept by reference, so a detail view shows a body as far as it has streamed.
    Listeners are called synchronously on the event loop (where the proxy calls begin and end);
    one that raises is logged and skipped, because the proxy must not fail for the inspector.
    """

    shows_headers = True  # the detail view shows them

    def __init__(self, limit: int = DEFAULT_LIMIT, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if limit < 1 or max_bytes < 0:
            raise ValueError("limit must be at least 1 and max_bytes not negative")
        self.limit = limit
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Exchange] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._listeners: list[Listener] = []

    def begin(self, exchange: Exchange) -> None:
        """Record a new exchange (its request head has arrived)."""
        if exchange.id in self._items:
            self._drop(exchange.id)
        self._items[exchange.id] = exchange
        self._account(exchange)
        self._notify("begin", exchange)
        self._evict(keep=exchange.id)

    def end(self, exchange: Exchange) -> None:
        """The exchange is complete (or failed); ignored if it was evicted meanwhile."""
        if self._items.get(exchange.id) is not exchange:
            return
        self._account(exchange)
        self._notify("end", exchange)
        self._evict(keep=exchange.id)

    def get(self, exchange_id: str) -> Exchange | None:
        return self._items.get(exchange_id)

    def newest_first(self) -> list[Exchange]:
        return list(reversed(self._items.values()))

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()
        self._bytes = 0
        self._notify("clear", None)

    def __len__(self) -> int:
        return len(self._items)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` on every change; returns a function that unsubscribes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    @property
    def subscribers(self) -> int:
        return len(self._listeners)

    def _account(self, exchange: Exchange) -> None:
        size = len(exchange.request_body) + len(exchange.response_body)
        self._bytes += size - self._sizes.get(exchange.id, 0)
        self._sizes[exchange.id] = size

    def _drop(self, exchange_id: str) -> Exchange:
        self._bytes -= self._sizes.pop(exchange_id, 0)
        return self._items.pop(exchange_id)

    def _evict(self, keep: str) -> None:
        """Drop the oldest exchanges (never ``keep``) until both bounds hold."""
        while len(self._items) > self.limit or (
            self._bytes > self.max_bytes and len(self._items) > 1
        ):
            victim = next(key for key in self._items if key != keep)
            self._notify("evict", self._drop(victim))

    def _notify(self, event: str, exchange: Exchange | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, exchange)
            except Exception:
                log.exception("inspector: a listener failed on %s", event)


# --- JSON views of an exchange -----------------------------------------------------------------


def summary(exchange: Exchange) -> dict[str, Any]:
    """The list row: small, and sent on every change over the event stream."""
    duration = exchange.duration
    return {
        "id": exchange.id,
        "tunnel": exchange.tunnel,
        "method": exchange.method,
        "path": exchange.target,
        "status": exchange.status,
        "reason": exchange.reason,
        "duration_ms": None if duration is None else round(duration * 1000, 3),
        "request_size": exchange.request_size,
        "response_size": exchange.response_size,
        "started": exchange.started,
        "client": exchange.client,
        "replay_of": exchange.replay_of,
        "error": exchange.error,
    }


def detail(exchange: Exchange) -> dict[str, Any]:
    """Everything about one exchange, bodies decoded for display (see ``describe_body``)."""
    return {
        **summary(exchange),
        "http_version": exchange.http_version,
        "request_headers": [[k, v] for k, v in exchange.request_headers],
        "response_headers": [[k, v] for k, v in exchange.response_headers],
        "request_body": describe_body(
            bytes(exchange.request_body),
            exchange.request_size,
            exchange.request_truncated,
            _content_type(exchange.request_headers),
        ),
        "response_body": describe_body(
            bytes(exchange.response_body),
            exchange.response_size,
            exchange.response_truncated,
            _content_type(exchange.response_headers),
        ),
    }


def describe_body(
    data: bytes, size: int, truncated: bool, content_type: str = ""
) -> dict[str, Any]:
    """How to show a body: ``json`` (pretty-printed text), ``utf-8`` (text) or ``base64`` (binary,
    with a hex preview of the first bytes). ``size`` is the real size; ``truncated`` says the
    kept bytes are only the first BODY_CAP of it, in which case JSON is shown as plain text since
    it cannot parse."""
    out: dict[str, Any] = {"size": size, "truncated": truncated}
    text = _as_text(data, truncated)
    if text is None:
        out["encoding"] = "base64"
        out["base64"] = base64.b64encode(data).decode("ascii")
        out["hex_preview"] = data[:HEX_PREVIEW].hex()
        return out
    if not truncated and ("json" in content_type.lower() or text.lstrip()[:1] in ("{", "[")):
        try:
            pretty = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except (ValueError, RecursionError):  # not JSON after all, or nested absurdly deep
            pass
        else:
            out["encoding"] = "json"
            out["text"] = pretty
            return out
    out["encoding"] = "utf-8"
    out["text"] = text
    return out


def _as_text(data: bytes, truncated: bool) -> str | None:
    """``data`` as text if it is UTF-8 without binary control characters, else None. A truncated
    body may end inside a character; that partial character is left out rather than failing."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not truncated)
    except UnicodeDecodeError:
        return None
    if "\x00" in text or len(_CONTROL.findall(text)) > len(text) // 100:
        return None
    return text


def _content_type(headers: list[tuple[str, str]]) -> str:
    return next((v for k, v in headers if k.lower() == "content-type"), "")


# --- the HTTP server ---------------------------------------------------------------------------


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


_CSP = (
    "default-src 'none'; "
    f"script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_PAGE_BYTES = PAGE.encode()
_COMMON_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Connection", "close"),
]


@dataclass
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]  # names lower-cased
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def _json(status: int, obj: Any) -> _Response:
    return _Response(status, json.dumps(obj, ensure_ascii=False).encode() + b"\n")


def _error(status: int, message: str) -> _Response:
    return _json(status, {"error": message})


class _Refused(Exception):
    """The request cannot be served as sent; answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Feed:
    """One event-stream subscriber's queue: bounded, and marked dropped when it overflows."""

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.dropped = False
        self.closed = False

    def push(self, event: str, exchange: Exchange | None) -> None:
        self.push_record(
            {"event": event} if exchange is None else {"event": event, **summary(exchange)}
        )

    def push_record(self, record: dict[str, Any]) -> None:
        if self.dropped:
            return
        if len(self.items) >= FEED_LIMIT:
            self.dropped = True
            self.items.clear()
        else:
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
            self.items.append(f"data: {line}\n\n".encode())
        self.wake.set()

    def close(self, _: object = None) -> None:
        self.closed = True
        self.wake.set()


class Inspector(LocalServer):
    """Serves the inspector page and its JSON API over ``store``.

    ``tunnels`` lists the agent's tunnels (dicts with name, public_url, local, kind) and is
    called on every /api/tunnels; ``replay`` re-sends an exchange's request to the local service
    and returns the new exchange (normally already recorded in ``store`` by the proxy).
    """

    def __init__(
        self,
        store: ExchangeStore,
        tunnels: Callable[[], list[dict[str, Any]]],
        replay: Callable[[Exchange], Awaitable[Exchange]],
        *,
        keepalive: float = KEEPALIVE,
    ) -> None:
        self.store = store
        self._tunnels = tunnels
        self._replay = replay
        self._keepalive = keepalive
        super().__init__()
        self._streams = 0
        self._replays = 0

    @property
    def url(self) -> str:
        if self.address is None:
            raise RuntimeError("inspector not started")
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def start(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> tuple[str, int]:
        """Listen on (host, port), port 0 picking a free one; returns the bound address.

        Raises InspectorBindError (``in_use`` set when the port is taken) rather than OSError,
        so the CLI can print one line or retry with port 0."""
        try:
            return await super().start(host, port)
        except OSError as err:
            in_use = err.errno == errno.EADDRINUSE
            reason = "the port is already in use" if in_use else (err.strerror or str(err))
            raise InspectorBindError(
                f"cannot serve the web inspector on {host}:{port}: {reason}", in_use=in_use
            ) from None

    # --- connections -------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        response: _Response | None
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = await _read_request(conn, reader)
            if request is None:
                return
            response = await self._dispatch(request, conn, reader, writer)
            complete = True
        except h11.RemoteProtocolError as err:
            response, complete = _error(err.error_status_hint, str(err)), False
        except _Refused as err:
            response, complete = _error(err.status, err.message), False
        except TimeoutError:
            response, complete = _error(408, "request not received in time"), False
        if response is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send(conn, writer, response)
            if not complete:
                await linger(reader, writer)
        writer.close()
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.wait_closed()  # returns once the response is flushed

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, response: _Response
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *_COMMON_HEADERS,
            *response.headers,
        ]
        data = _h11_bytes(conn, _response_head(response.status, headers))
        if response.body:
            data += _h11_bytes(conn, h11.Data(data=response.body))
        data += _h11_bytes(conn, h11.EndOfMessage())
        writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    # --- routes ------------------------------------------------------------------------------

    async def _dispatch(
        self,
        request: _Request,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> _Response | None:
        """Answer ``request``; None when the route wrote its own response (the event stream)."""
        refusal = self._check_origin(request)
        if refusal is not None:
            return _error(403, refusal)
        path, method = request.path, request.method
        if path == "/":
            if method != "GET":
                return _not_allowed("GET")
            return _Response(
                200,
                _PAGE_BYTES,
                "text/html; charset=utf-8",
                [("Content-Security-Policy", _CSP)],
            )
        if path == "/api/tunnels":
            if method != "GET":
                return _not_allowed("GET")
            try:
                tunnels = list(self._tunnels())
            except Exception:
                log.exception("inspector: listing tunnels failed")
                return _error(500, "could not list the tunnels")
            return _json(200, {"tunnels": tunnels})
        if path == "/api/requests":
            if method != "GET":
                return _not_allowed("GET")
            return _json(200, {"requests": [summary(e) for e in self.store.newest_first()]})
        if path == "/api/events":
            if method != "GET":
                return _not_allowed("GET")
            if self._streams >= MAX_STREAMS:
                return _error(503, "too many open event streams; close some inspector tabs")
            snapshot = "snapshot=1" in request.target.partition("?")[2].split("&")
            await self._stream_events(conn, reader, writer, snapshot)
            return None
        match = _ID.fullmatch(path)
        if match is None:
            return _error(404, "not found")
        exchange = self.store.get(match[1])
        if match[2] is None:
            if method != "GET":
                return _not_allowed("GET")
            if exchange is None:
                return _error(404, f"no request {match[1]} (it may have been evicted)")
            return _json(200, detail(exchange))
        if method != "POST":
            return _not_allowed("POST")
        if exchange is None:
            return _error(404, f"no request {match[1]} (it may have been evicted)")
        return await self._do_replay(exchange)

    def _check_origin(self, request: _Request) -> str | None:
        """Why ``request`` is refused (403), or None: its Host must name this machine's loopback
        or the bound address (DNS rebinding), and a POST's Origin, if any, must be this page's.
        """
        hosts = request.header("host")
        if len(hosts) != 1:
            return "exactly one Host header is required"
        host = _split_host(hosts[0])
        if host is None or not self._is_own_host(host[0]):
            return "the Host header does not name the inspector; open it at http://127.0.0.1:PORT"
        if request.method == "POST":
            origins = request.header("origin")
            if len(origins) > 1:
                return "more than one Origin header"
            if origins and not _same_origin(origins[0], host):
                return "cross-origin requests may not change anything"
        return None

    def _is_own_host(self, name: str) -> bool:
        if name == "localhost":
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        if ip.is_loopback:
            return True
        if self.address is None:
            return False
        with contextlib.suppress(ValueError):
            bound = ipaddress.ip_address(self.address[0])
            return ip == bound and not bound.is_unspecified
        return False

    async def _do_replay(self, exchange: Exchange) -> _Response:
        if exchange.request_truncated:
            return _error(
                409,
                f"the request body ({exchange.request_size} bytes) was larger than what the "
                "inspector keeps, so it cannot be replayed exactly",
            )
        if self._replays >= MAX_REPLAYS:
            return _error(429, "too many replays in progress; try again when they finish")
        self._replays += 1
        try:
            async with asyncio.timeout(REPLAY_TIMEOUT) as deadline:
                new = await self._replay(exchange)
        except Exception as err:
            if isinstance(err, TimeoutError) and deadline.expired():
                return _error(504, f"the replay got no answer within {REPLAY_TIMEOUT:g} s")
            message = (str(err).splitlines() or [""])[0] or type(err).__name__
            log.info("inspector: replay of %s failed: %s", exchange.id, message)
            return _error(502, f"replay failed: {message}")
        finally:
            self._replays -= 1
        if self.store.get(new.id) is None:
            # The proxy records replays itself; this covers a replay function that does not.
            self.store.begin(new)
            self.store.end(new)
        return _json(201, {"id": new.id})

    async def _stream_events(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        snapshot: bool,
    ) -> None:
        """Serve Server-Sent Events until the client leaves, falls FEED_LIMIT events behind,
        stops reading for WRITE_TIMEOUT, or the inspector closes.

        With ``snapshot`` (``?snapshot=1``, what the page asks for) the first event is the whole
        list, ``{"event": "snapshot", "requests": [...]}``, taken in the same step as subscribing:
        a list fetched separately could cross live events in flight and undo them."""
        feed = _Feed()
        unsubscribe = self.store.subscribe(feed.push)
        if snapshot:
            feed.push_record(
                {"event": "snapshot", "requests": [summary(e) for e in self.store.newest_first()]}
            )
        # The client sends nothing more; a read returning is its going away (or misbehaving).
        watcher = asyncio.ensure_future(reader.read(1))
        watcher.add_done_callback(feed.close)
        self._streams += 1
        try:
            headers = [("Content-Type", "text/event-stream"), *_COMMON_HEADERS]
            head = _h11_bytes(conn, _response_head(200, headers))
            await self._write(writer, head + _h11_bytes(conn, h11.Data(data=b"retry: 2000\n\n")))
            while True:
                try:
                    async with asyncio.timeout(self._keepalive):
                        await feed.wake.wait()
                except TimeoutError:
                    await self._write(writer, _h11_bytes(conn, h11.Data(data=b": keepalive\n\n")))
                    continue
                feed.wake.clear()
                if feed.closed or feed.dropped:
                    if feed.dropped:
                        log.info("inspector: dropped an event stream that fell behind")
                    break
                batch = b"".join(feed.items)
                feed.items.clear()
                await self._write(writer, _h11_bytes(conn, h11.Data(data=batch)))
            if not feed.closed:
                await self._write(writer, _h11_bytes(conn, h11.EndOfMessage()))
        finally:
            self._streams -= 1
            unsubscribe()
            watcher.cancel()

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> _Request | None:
    """Read one whole request; None if the client closed before sending one.

    h11's ``max_incomplete_event_size`` only refuses a head still incomplete past the limit, so
    until the head has parsed at most MAX_HEAD + 1 bytes are read: a longer head can then never
    be complete, and h11 answers it with 431."""
    request: h11.Request | None = None
    body = bytearray()
    head_bytes = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if request is None:
                room = MAX_HEAD + 1 - head_bytes
                if room <= 0:
                    raise _Refused(431, f"request head over {MAX_HEAD} bytes")
                data = await reader.read(min(room, 64 * 1024))
                head_bytes += len(data)
            else:
                data = await reader.read(64 * 1024)
            conn.receive_data(data)
        elif isinstance(event, h11.ConnectionClosed):
            return None
        elif isinstance(event, h11.Request):
            request = event
            for name, value in event.headers:
                if name == b"content-length" and int(value) > MAX_BODY:
                    raise _Refused(413, f"request body over {MAX_BODY} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _Refused(413, f"request body over {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return _Request(
                method=request.method.decode("ascii", "replace"),
                target=request.target.decode("ascii", "replace"),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers],
                body=bytes(body),
            )


def _response_head(status: int, headers: list[tuple[str, str]]) -> h11.Response:
    return h11.Response(
        status_code=status, headers=headers, reason=http.HTTPStatus(status).phrase.encode()
    )


def _h11_bytes(conn: h11.Connection, event: h11.Response | h11.Data | h11.EndOfMessage) -> bytes:
    return conn.send(event) or b""


def _not_allowed(allow: str) -> _Response:
    response = _error(405, f"method not allowed; use {allow}")
    response.headers.append(("Allow", allow))
    return response


def _split_host(value: str) -> tuple[str, int | None] | None:
    """(name, port) from a Host header value or URL authority; None if malformed. The name is
    lower-cased, without IPv6 brackets or a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket:
            return None
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest[:1] == ":" and rest[1:].isdigit() and len(rest) <= 6):
        return None
    name = name.rstrip(".")
    if not name:
        return None
    return name, int(rest[1:]) if rest else None


def _same_origin(origin: str, host: tuple[str, int | None]) -> bool:
    """Whether an Origin header names the page at ``host`` (the request's own Host)."""
    parts = urlsplit(origin)
    if parts.scheme != "http" or f"http://{parts.netloc}" != origin.strip():
        return False
    own = _split_host(parts.netloc)
    return own is not None and (own[0], own[1] or 80) == (host[0], host[1] or 80)
