"""The web inspector's store and HTTP API, spoken to over real HTTP on 127.0.0.1.

The inspector runs on the test's event loop; the blocking http.client calls run in threads, so
the store can be changed (as the proxy would) while a client waits on the event stream."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import queue
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from burrow.errors import BurrowError
from burrow.http import inspector as inspector_module
from burrow.http.inspector import (
    ExchangeStore,
    Inspector,
    InspectorBindError,
    describe_body,
)
from burrow.http.inspector_page import SCRIPT, STYLE
from burrow.http.record import BODY_CAP, Exchange

TUNNELS = [
    {"name": "web", "public_url": "https://abc.example", "local": "127.0.0.1:3000", "kind": "http"}
]


def make_exchange(
    method: str = "GET",
    target: str = "/",
    *,
    status: int | None = 200,
    request_body: bytes = b"",
    response_body: bytes = b"",
    response_type: str = "application/json",
    started: float | None = None,
) -> Exchange:
    exchange = Exchange(
        tunnel="web",
        method=method,
        target=target,
        http_version="1.1",
        request_headers=[("Host", "abc.example"), ("User-Agent", "test/1")],
        client="203.0.113.7:51234",
    )
    if started is not None:
        exchange.started = started
    exchange.add_request_body(request_body)
    exchange.status = status
    exchange.reason = "OK" if status == 200 else ""
    exchange.response_headers = [("Content-Type", response_type)]
    exchange.add_response_body(response_body)
    exchange.duration = 0.0125
    return exchange


def record(store: ExchangeStore, exchange: Exchange) -> Exchange:
    store.begin(exchange)
    store.end(exchange)
    return exchange


@dataclass
class FakeReplay:
    """Records what it was asked to replay and records a new exchange, as the proxy does."""

    store: ExchangeStore
    calls: list[Exchange] = field(default_factory=list)
    fail: Exception | None = None

    async def __call__(self, exchange: Exchange) -> Exchange:
        self.calls.append(exchange)
        if self.fail is not None:
            raise self.fail
        new = make_exchange(exchange.method, exchange.target, response_body=b'{"again":true}')
        new.replay_of = exchange.id
        return record(self.store, new)


@dataclass
class Setup:
    store: ExchangeStore
    replay: FakeReplay
    inspector: Inspector
    address: tuple[str, int]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    store = ExchangeStore(limit=50)
    replay = FakeReplay(store)
    inspector = Inspector(store, lambda: TUNNELS, replay)
    address = await inspector.start(port=0)
    try:
        yield Setup(store, replay, inspector, address)
    finally:
        await inspector.close()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    address: tuple[str, int],
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Reply:
    def go() -> Reply:
        conn = http.client.HTTPConnection(*address, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return Reply(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            conn.close()

    return await asyncio.to_thread(go)


async def raw(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` as is and return everything the server answers until it closes."""

    def go() -> bytes:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(data)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    return await asyncio.to_thread(go)


# --- the page ------------------------------------------------------------------------------


async def test_page_is_served_with_a_csp_that_allows_exactly_its_script(setup: Setup) -> None:
    reply = await call(setup.address, "GET", "/")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/html")
    page = reply.body.decode()
    for hook in ('id="detail"', 'id="replay"', 'id="rows"', "EventSource", "/api/events"):
        assert hook in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no external assets
    csp = reply.headers["content-security-policy"]
    for source in (SCRIPT, STYLE):
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
        assert source in page
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert reply.headers["x-frame-options"] == "DENY"


async def test_tunnels(setup: Setup) -> None:
    reply = await call(setup.address, "GET", "/api/tunnels")
    assert reply.status == 200
    assert reply.json() == {"tunnels": TUNNELS}


# --- list and detail ---------------------------------------------------------------------------


async def test_list_is_newest_first_with_summaries(setup: Setup) -> None:
    first = record(setup.store, make_exchange("GET", "/one", started=1000.0))
    second = record(setup.store, make_exchange("POST", "/two?x=1", status=201, started=1001.0))
    pending = make_exchange("GET", "/slow", status=None)
    pending.duration = None
    setup.store.begin(pending)

    reply = await call(setup.address, "GET", "/api/requests")
    assert reply.status == 200
    rows = reply.json()["requests"]
    assert [r["id"] for r in rows] == [pending.id, second.id, first.id]
    assert rows[1] == {
        "id": second.id,
        "tunnel": "web",
        "method": "POST",
        "path": "/two?x=1",
        "status": 201,
        "reason": "",
        "duration_ms": 12.5,
        "request_size": 0,
        "response_size": 0,
        "started": 1001.0,
        "client": "203.0.113.7:51234",
        "replay_of": None,
        "error": None,
    }
    assert rows[0]["status"] is None and rows[0]["duration_ms"] is None


async def test_detail_pretty_prints_json_and_lists_headers(setup: Setup) -> None:
    exchange = record(
        setup.store,
        make_exchange(
            "POST",
            "/api/orders",
            request_body=b"name=book&qty=2",
            response_body=b'{"id":7,"items":["a","b"],"note":"d\\u00e9j\\u00e0"}',
        ),
    )
    reply = await call(setup.address, "GET", f"/api/requests/{exchange.id}")
    assert reply.status == 200
    detail = reply.json()
    assert detail["id"] == exchange.id and detail["method"] == "POST" and detail["status"] == 200
    assert detail["request_headers"] == [["Host", "abc.example"], ["User-Agent", "test/1"]]
    assert detail["response_headers"] == [["Content-Type", "application/json"]]
    assert detail["request_body"] == {
        "size": 15,
        "truncated": False,
        "encoding": "utf-8",
        "text": "name=book&qty=2",
    }
    body = detail["response_body"]
    assert body["encoding"] == "json"
    assert body["text"] == json.dumps(
        {"id": 7, "items": ["a", "b"], "note": "déjà"}, indent=2, ensure_ascii=False
    )
    assert body["text"].startswith('{\n  "id": 7,')


async def test_detail_shows_binary_as_base64_and_hex(setup: Setup) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2
    exchange = record(
        setup.store, make_exchange("GET", "/logo.png", response_body=png, response_type="image/png")
    )
    body = (await call(setup.address, "GET", f"/api/requests/{exchange.id}")).json()[
        "response_body"
    ]
    assert body["encoding"] == "base64" and body["size"] == len(png) and not body["truncated"]
    assert base64.b64decode(body["base64"]) == png
    assert body["hex_preview"] == png[:256].hex()
    assert "text" not in body


async def test_truncated_bodies_are_flagged_and_shown_as_text(setup: Setup) -> None:
    big_json = b'{"data":"' + b"x" * BODY_CAP + b'"}'
    # One "a" then two-byte characters: the cap falls in the middle of one.
    big_text = ("a" + "é" * (BODY_CAP // 2 + 10)).encode()
    exchange = record(
        setup.store,
        make_exchange("PUT", "/upload", request_body=big_text, response_body=big_json),
    )
    detail = (await call(setup.address, "GET", f"/api/requests/{exchange.id}")).json()
    response = detail["response_body"]
    assert response["size"] == len(big_json) and response["truncated"] is True
    assert response["encoding"] == "utf-8"  # a cut JSON document is shown as the text it is
    assert len(response["text"]) == BODY_CAP
    request = detail["request_body"]
    assert request["truncated"] is True and request["encoding"] == "utf-8"
    assert request["text"] == "a" + "é" * ((BODY_CAP - 1) // 2)


def test_describe_body_edge_cases() -> None:
    assert describe_body(b"", 0, False) == {
        "size": 0,
        "truncated": False,
        "encoding": "utf-8",
        "text": "",
    }
    # Looks like JSON but is not: shown as text.
    assert describe_body(b"{nope", 5, False)["encoding"] == "utf-8"
    # UTF-8 with NULs is binary, not text.
    assert describe_body(b"ab\x00cd", 5, False)["encoding"] == "base64"
    # Nested deeper than the parser can go: still answered, as text.
    deep = b"[" * 100_000 + b"]" * 100_000
    assert describe_body(deep, len(deep), False, "application/json")["encoding"] == "utf-8"
    # JSON under a vendor type is recognised.
    assert describe_body(b"[1]", 3, False, "application/vnd.api+json")["encoding"] == "json"


async def test_unknown_ids_and_paths_are_404(setup: Setup) -> None:
    for method, path in [
        ("GET", "/api/requests/req_nope"),
        ("POST", "/api/requests/req_nope/replay"),
        ("GET", "/api/requests/a%2Fb"),
        ("GET", "/nowhere"),
    ]:
        reply = await call(setup.address, method, path)
        assert reply.status == 404, path
        assert "error" in reply.json()
    assert setup.replay.calls == []


async def test_wrong_method_is_405(setup: Setup) -> None:
    reply = await call(setup.address, "DELETE", "/api/requests")
    assert reply.status == 405 and reply.headers["allow"] == "GET"
    exchange = record(setup.store, make_exchange())
    reply = await call(setup.address, "GET", f"/api/requests/{exchange.id}/replay")
    assert reply.status == 405 and reply.headers["allow"] == "POST"


# --- replay ------------------------------------------------------------------------------------


async def test_replay_returns_201_with_the_new_id(setup: Setup) -> None:
    original = record(setup.store, make_exchange("POST", "/hook", request_body=b'{"a":1}'))
    reply = await call(setup.address, "POST", f"/api/requests/{original.id}/replay")
    assert reply.status == 201
    new_id = reply.json()["id"]
    assert setup.replay.calls == [original]
    rows = (await call(setup.address, "GET", "/api/requests")).json()["requests"]
    assert rows[0]["id"] == new_id and rows[0]["replay_of"] == original.id
    assert rows[1]["id"] == original.id


async def test_replay_failure_is_502_with_the_reason(setup: Setup) -> None:
    original = record(setup.store, make_exchange("GET", "/"))
    setup.replay.fail = ConnectionRefusedError("nothing listens on 127.0.0.1:3000\nmore detail")
    reply = await call(setup.address, "POST", f"/api/requests/{original.id}/replay")
    assert reply.status == 502
    assert reply.json() == {"error": "replay failed: nothing listens on 127.0.0.1:3000"}
    assert len(setup.store) == 1


async def test_replay_that_does_not_record_is_recorded_by_the_inspector(setup: Setup) -> None:
    async def replay(exchange: Exchange) -> Exchange:
        new = make_exchange(exchange.method, exchange.target)
        new.replay_of = exchange.id
        return new  # not recorded

    inspector = Inspector(setup.store, lambda: [], replay)
    address = await inspector.start(port=0)
    try:
        original = record(setup.store, make_exchange())
        reply = await call(address, "POST", f"/api/requests/{original.id}/replay")
        assert reply.status == 201
        assert setup.store.get(reply.json()["id"]) is not None
    finally:
        await inspector.close()


async def test_replay_of_a_truncated_request_is_refused(setup: Setup) -> None:
    original = record(
        setup.store, make_exchange("POST", "/big", request_body=b"x" * (BODY_CAP + 1))
    )
    reply = await call(setup.address, "POST", f"/api/requests/{original.id}/replay")
    assert reply.status == 409
    assert "cannot be replayed" in reply.json()["error"]
    assert setup.replay.calls == []


# --- the event stream --------------------------------------------------------------------------


class EventReader:
    """Reads an SSE stream in a thread; lines go to a queue, None when the stream ends."""

    def __init__(self, address: tuple[str, int], path: str = "/api/events") -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.conn = http.client.HTTPConnection(*address, timeout=10)
        self.conn.request("GET", path)
        self.response = self.conn.getresponse()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while line := self.response.readline():
                self.lines.put(line.decode().rstrip("\n"))
        except OSError:
            pass
        finally:
            self.lines.put(None)

    async def next_line(self, keep: Callable[[str], bool] = bool) -> str | None:
        """The next line satisfying ``keep`` (default: non-empty), or None at the end."""
        while True:
            line = await asyncio.to_thread(self.lines.get, timeout=10)
            if line is None or keep(line):
                return line

    async def next_event(self) -> dict[str, Any]:
        line = await self.next_line(lambda s: s.startswith("data: "))
        assert line is not None, "the stream ended"
        event: dict[str, Any] = json.loads(line[len("data: ") :])
        return event

    def close(self) -> None:
        self.conn.close()


async def test_event_stream_delivers_begin_and_end(setup: Setup) -> None:
    reader = await asyncio.to_thread(EventReader, setup.address)
    try:
        assert reader.response.status == 200
        assert reader.response.getheader("content-type") == "text/event-stream"
        assert await reader.next_line() == "retry: 2000"
        exchange = make_exchange("GET", "/live", status=None)
        exchange.duration = None
        setup.store.begin(exchange)
        event = await reader.next_event()
        assert event["event"] == "begin" and event["id"] == exchange.id
        assert event["path"] == "/live" and event["status"] is None

        exchange.status, exchange.duration = 204, 0.5
        setup.store.end(exchange)
        event = await reader.next_event()
        assert event["event"] == "end" and event["status"] == 204 and event["duration_ms"] == 500

        setup.store.clear()
        assert (await reader.next_event()) == {"event": "clear"}
    finally:
        reader.close()


async def test_event_stream_can_start_with_a_snapshot(setup: Setup) -> None:
    """What the page uses: the list and the live changes after it, with no gap between."""
    first = record(setup.store, make_exchange("GET", "/1"))
    second = record(setup.store, make_exchange("GET", "/2"))
    reader = await asyncio.to_thread(EventReader, setup.address, "/api/events?snapshot=1")
    try:
        snapshot = await reader.next_event()
        assert snapshot["event"] == "snapshot"
        assert [r["id"] for r in snapshot["requests"]] == [second.id, first.id]
        third = record(setup.store, make_exchange("GET", "/3"))
        assert (await reader.next_event())["id"] == third.id
    finally:
        reader.close()


async def test_event_stream_sends_keepalives(setup: Setup) -> None:
    inspector = Inspector(setup.store, lambda: [], setup.replay, keepalive=0.1)
    address = await inspector.start(port=0)
    reader = await asyncio.to_thread(EventReader, address)
    try:
        assert await reader.next_line(lambda s: s.startswith(":")) == ": keepalive"
    finally:
        reader.close()
        await inspector.close()


async def test_event_stream_subscriber_that_falls_behind_is_dropped(setup: Setup) -> None:
    reader = await asyncio.to_thread(EventReader, setup.address)
    try:
        assert await reader.next_line() == "retry: 2000"
        assert setup.store.subscribers == 1
        # All in one go, so the stream cannot send any before its queue overflows.
        for i in range(inspector_module.FEED_LIMIT + 1):
            setup.store.begin(make_exchange("GET", f"/{i}"))
        assert await reader.next_line(lambda s: False) is None  # the server ended the stream
        assert setup.store.subscribers == 0
        # The store itself is unaffected, and a new stream works.
        assert len(setup.store) == setup.store.limit
    finally:
        reader.close()
    again = await asyncio.to_thread(EventReader, setup.address)
    try:
        assert await again.next_line() == "retry: 2000"
        setup.store.begin(make_exchange("GET", "/after"))
        assert (await again.next_event())["path"] == "/after"
    finally:
        again.close()


async def test_close_ends_open_event_streams(setup: Setup) -> None:
    reader = await asyncio.to_thread(EventReader, setup.address)
    try:
        assert await reader.next_line() == "retry: 2000"
        async with asyncio.timeout(5):
            await setup.inspector.close()
        assert await reader.next_line(lambda s: False) is None
        assert setup.store.subscribers == 0
    finally:
        reader.close()


# --- the store ---------------------------------------------------------------------------------


def test_store_evicts_the_oldest_and_tells_listeners() -> None:
    store = ExchangeStore(limit=3)
    events: list[tuple[str, str | None]] = []
    store.subscribe(lambda event, ex: events.append((event, ex.id if ex else None)))
    exchanges = [make_exchange("GET", f"/{i}") for i in range(5)]
    for exchange in exchanges:
        store.begin(exchange)
    assert [e.id for e in store.newest_first()] == [e.id for e in reversed(exchanges[2:])]
    assert store.get(exchanges[0].id) is None and store.get(exchanges[4].id) is exchanges[4]
    assert ("evict", exchanges[0].id) in events and ("evict", exchanges[1].id) in events

    events.clear()
    store.end(exchanges[0])  # evicted while in flight: ignored
    assert events == []
    store.end(exchanges[4])
    assert events == [("end", exchanges[4].id)]


def test_store_bounds_the_bytes_it_keeps() -> None:
    store = ExchangeStore(limit=100, max_bytes=2500)
    exchanges = [record(store, make_exchange(response_body=b"x" * 1000)) for _ in range(4)]
    kept = store.newest_first()
    assert kept == [exchanges[3], exchanges[2]]
    # A single exchange over the budget is still kept: it is the one being looked at.
    huge = record(store, make_exchange(response_body=b"y" * 5000))
    assert store.newest_first() == [huge]


def test_store_clear_and_failing_listener(caplog: pytest.LogCaptureFixture) -> None:
    store = ExchangeStore()
    seen: list[str] = []

    def broken(event: str, exchange: Exchange | None) -> None:
        raise RuntimeError("listener bug")

    store.subscribe(broken)
    unsubscribe = store.subscribe(lambda event, exchange: seen.append(event))
    record(store, make_exchange())  # the broken listener does not stop the proxy or the others
    assert seen == ["begin", "end"] and len(store) == 1
    assert "listener failed" in caplog.text
    store.clear()
    assert len(store) == 0 and seen[-1] == "clear"
    unsubscribe()
    unsubscribe()  # twice is harmless
    assert store.subscribers == 1


# --- security ----------------------------------------------------------------------------------


async def test_foreign_host_header_is_403(setup: Setup) -> None:
    port = setup.address[1]
    for host in ["evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::1"]:
        reply = await call(setup.address, "GET", "/api/requests", headers={"Host": host})
        assert reply.status in (400, 403), host
        if reply.status == 403:
            assert "Host" in reply.json()["error"]
    reply = await call(setup.address, "GET", "/", headers={"Host": "evil.example"})
    assert reply.status == 403 and b"<html" not in reply.body
    for host in [
        f"localhost:{port}",
        f"127.0.0.1:{port}",
        f"[::1]:{port}",
        "127.0.0.2",
        "LOCALHOST",
    ]:
        reply = await call(setup.address, "GET", "/api/requests", headers={"Host": host})
        assert reply.status == 200, host


async def test_missing_host_header_is_403(setup: Setup) -> None:
    answer = await raw(setup.address, b"GET /api/requests HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 ")


async def test_cross_origin_post_is_403(setup: Setup) -> None:
    original = record(setup.store, make_exchange())
    path = f"/api/requests/{original.id}/replay"
    port = setup.address[1]
    for origin in [
        "http://evil.example",
        "null",
        f"http://localhost:{port + 1}",
        "https://127.0.0.1",
    ]:
        reply = await call(setup.address, "POST", path, headers={"Origin": origin})
        assert reply.status == 403, origin
    assert setup.replay.calls == []
    reply = await call(setup.address, "POST", path, headers={"Origin": f"http://127.0.0.1:{port}"})
    assert reply.status == 201
    reply = await call(setup.address, "POST", path)  # no Origin: not from a browser page
    assert reply.status == 201
    assert len(setup.replay.calls) == 2


# --- limits and errors -------------------------------------------------------------------------


async def test_oversized_head_is_431(setup: Setup) -> None:
    reply = await call(setup.address, "GET", "/api/tunnels", headers={"X-Big": "a" * 20_000})
    assert reply.status == 431
    reply = await call(setup.address, "GET", "/api/tunnels", headers={"X-Ok": "a" * 8_000})
    assert reply.status == 200


async def test_oversized_body_is_413(setup: Setup) -> None:
    original = record(setup.store, make_exchange())
    path = f"/api/requests/{original.id}/replay"
    reply = await call(setup.address, "POST", path, body=b"x" * (inspector_module.MAX_BODY + 1))
    assert reply.status == 413
    assert setup.replay.calls == []


async def test_malformed_request_is_400(setup: Setup) -> None:
    answer = await raw(setup.address, b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_slow_request_is_408(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inspector_module, "READ_TIMEOUT", 0.2)
    answer = await raw(setup.address, b"GET /api/tunnels HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_port_in_use_is_a_one_line_error(setup: Setup) -> None:
    other = Inspector(setup.store, lambda: [], setup.replay)
    with pytest.raises(InspectorBindError) as info:
        await other.start("127.0.0.1", setup.address[1])
    error = info.value
    assert isinstance(error, BurrowError) and error.in_use
    assert str(error) == (
        f"cannot serve the web inspector on 127.0.0.1:{setup.address[1]}: "
        "the port is already in use"
    )
    # The caller's fallback: any free port.
    _, port = await other.start("127.0.0.1", 0)
    assert port not in (0, setup.address[1])
    await other.close()
