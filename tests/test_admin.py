"""The admin endpoint over real sockets on 127.0.0.1, plus the metrics it renders."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from burrow.net import admin
from burrow.net.admin import MAX_HEAD, AdminServer, RelayMetrics


@pytest.fixture
def metrics() -> RelayMetrics:
    return RelayMetrics()


@pytest.fixture
async def server(metrics: RelayMetrics) -> AsyncIterator[tuple[str, int]]:
    srv = AdminServer(metrics, lambda: {"status": "ok", "sessions": metrics.sessions.value})
    addr = await srv.start("127.0.0.1", 0)
    yield addr
    await srv.close()


async def request(addr: tuple[str, int], raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` and read until the server closes; returns (status, headers, body)."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n".encode()


async def test_healthz(server: tuple[str, int], metrics: RelayMetrics) -> None:
    metrics.session_opened()
    metrics.session_opened()
    status, headers, body = await request(server, get("/healthz"))
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body) == {"status": "ok", "sessions": 2}


async def test_healthz_query_string_ignored(server: tuple[str, int]) -> None:
    status, _, _ = await request(server, get("/healthz?verbose=1"))
    assert status == 200


async def test_metrics(server: tuple[str, int], metrics: RelayMetrics) -> None:
    metrics.session_opened()
    metrics.stream_opened()
    metrics.stream_opened()
    metrics.stream_closed()
    metrics.add_bytes("in", 1000)
    metrics.add_bytes("out", 7)
    metrics.add_bytes("in", 234)
    metrics.error("auth")
    metrics.tunnel_opened("tcp")
    status, headers, body = await request(server, get("/metrics"))
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["connection"] == "close"
    text = body.decode()
    assert "# TYPE burrow_sessions gauge" in text
    assert "burrow_sessions 1.0" in text
    assert "burrow_streams_open 1.0" in text
    assert "burrow_streams_total 2.0" in text
    assert 'burrow_bytes_total{direction="in"} 1234.0' in text
    assert 'burrow_bytes_total{direction="out"} 7.0' in text
    assert 'burrow_errors_total{kind="auth"} 1.0' in text
    assert 'burrow_tunnels{kind="tcp"} 1.0' in text


def test_render_parses_as_prometheus_text(metrics: RelayMetrics) -> None:
    metrics.stream_opened()
    metrics.add_bytes("out", 5)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    assert samples[("burrow_streams_open", ())] == 1
    assert samples[("burrow_streams_total", ())] == 1
    assert samples[("burrow_bytes_total", (("direction", "out"),))] == 5
    assert samples[("burrow_bytes_total", (("direction", "in"),))] == 0
    assert samples[("burrow_sessions", ())] == 0


def test_types_in_exposition(metrics: RelayMetrics) -> None:
    text = metrics.render().decode()
    for line in [
        "# TYPE burrow_sessions gauge",
        "# TYPE burrow_streams_open gauge",
        "# TYPE burrow_streams_total counter",
        "# TYPE burrow_bytes_total counter",
        "# TYPE burrow_errors_total counter",
        "# TYPE burrow_tunnels gauge",
    ]:
        assert line in text.splitlines()


def test_registries_are_private() -> None:
    a, b = RelayMetrics(), RelayMetrics()
    a.session_opened()
    assert b"burrow_sessions 1.0" in a.render()
    assert b"burrow_sessions 0.0" in b.render()
    assert a.registry is not b.registry


def test_label_cardinality_is_capped(metrics: RelayMetrics) -> None:
    for i in range(admin.MAX_LABEL_VALUES + 10):
        metrics.error(f"kind{i}")
    assert metrics.errors.get("other") == 10
    assert metrics.errors.get("kind0") == 1
    assert len(metrics.errors.items()) == admin.MAX_LABEL_VALUES + 1


def test_tunnel_gauge(metrics: RelayMetrics) -> None:
    metrics.tunnel_opened("tcp")
    metrics.tunnel_opened("tcp")
    metrics.tunnel_closed("tcp")
    assert metrics.tunnels.get("tcp") == 1
    assert metrics.tunnels.get("http") == 0
    assert "http" not in dict(metrics.tunnels.items())  # reading does not create a series


def test_prometheus_client_style_calls(metrics: RelayMetrics) -> None:
    """The calls a relay written against prometheus_client's Gauge/Counter would make."""
    metrics.sessions.set(3)
    metrics.streams.inc()
    metrics.streams.inc()
    metrics.streams.dec()
    metrics.streams_total.inc()
    metrics.errors.labels(kind="handshake").inc()
    metrics.errors.labels("handshake").inc()
    metrics.tunnels.labels(kind="tcp").set(2)
    metrics.bytes.labels(direction="out").inc(10)
    text = metrics.render().decode().splitlines()
    assert "burrow_sessions 3.0" in text
    assert "burrow_streams_open 1.0" in text
    assert "burrow_streams_total 1.0" in text
    assert 'burrow_errors_total{kind="handshake"} 2.0' in text
    assert 'burrow_tunnels{kind="tcp"} 2.0' in text
    assert 'burrow_bytes_total{direction="out"} 10.0' in text
    with pytest.raises(ValueError):
        metrics.streams_total.inc(-1)
    with pytest.raises(ValueError):
        metrics.errors.labels(code="x")


async def test_not_found(server: tuple[str, int]) -> None:
    status, headers, _ = await request(server, get("/nope"))
    assert status == 404
    assert headers["connection"] == "close"


async def test_method_not_allowed(server: tuple[str, int]) -> None:
    status, headers, _ = await request(server, get("/metrics", "POST"))
    assert status == 405
    assert headers["allow"] == "GET"


@pytest.mark.parametrize(
    "raw",
    [b"garbage\r\n\r\n", b"GET /healthz\r\n\r\n", b"GET / HTTP/1.1\r\nno colon\r\n\r\n"],
)
async def test_bad_request(server: tuple[str, int], raw: bytes) -> None:
    status, _, _ = await request(server, raw)
    assert status == 400


async def test_oversized_head_is_refused(server: tuple[str, int]) -> None:
    raw = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEAD + 1000) + b"\r\n\r\n"
    try:
        status, headers, _ = await request(server, raw)
    except (ConnectionResetError, BrokenPipeError):
        return  # closed without a response is an acceptable refusal too
    assert status == 431
    assert headers["connection"] == "close"


async def test_endless_head_is_cut_off(server: tuple[str, int]) -> None:
    """A client that keeps sending header bytes is stopped at the limit, not buffered forever."""
    reader, writer = await asyncio.open_connection(*server)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        sent = 0
        with pytest.raises((ConnectionError, BrokenPipeError)):
            while sent < 10 * 1024 * 1024:
                writer.write(b"X-Pad: " + b"a" * 1000 + b"\r\n")
                await asyncio.wait_for(writer.drain(), 5)
                sent += 1009
        assert sent < 10 * 1024 * 1024
    finally:
        writer.close()
    del reader


async def test_slow_client_times_out(
    server: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "READ_TIMEOUT", 0.2)
    status, _, _ = await request(server, b"GET /healthz HTTP/1.1\r\n")
    assert status == 408


async def test_client_closing_early_is_harmless(server: tuple[str, int]) -> None:
    _, writer = await asyncio.open_connection(*server)
    writer.write(b"GET /hea")
    writer.close()
    await writer.wait_closed()
    status, _, _ = await request(server, get("/healthz"))
    assert status == 200


async def test_unhealthy_is_503() -> None:
    srv = AdminServer(RelayMetrics(), lambda: {"status": "draining"})
    addr = await srv.start("127.0.0.1", 0)
    try:
        status, _, body = await request(addr, get("/healthz"))
    finally:
        await srv.close()
    assert status == 503
    assert json.loads(body) == {"status": "draining"}


async def test_health_callback_error_is_500() -> None:
    def boom() -> dict[str, Any]:
        raise RuntimeError("boom")

    srv = AdminServer(RelayMetrics(), boom)
    addr = await srv.start("127.0.0.1", 0)
    try:
        status, _, body = await request(addr, get("/healthz"))
    finally:
        await srv.close()
    assert status == 500
    assert json.loads(body) == {"status": "error"}


async def test_close_drops_idle_connections(metrics: RelayMetrics) -> None:
    srv = AdminServer(metrics, lambda: {"status": "ok"})
    addr = await srv.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # never finished
    await writer.drain()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(srv.close(), 2)
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(*addr)


async def test_connections_beyond_the_cap_are_dropped(
    server: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin.AdminServer, "max_connections", 1)
    _, idle = await asyncio.open_connection(*server)
    idle.write(b"GET /healthz HTTP/1.1\r\n")  # holds the only slot
    await idle.drain()
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection(*server)
    writer.write(get("/healthz"))
    try:
        assert await asyncio.wait_for(reader.read(), 2) == b""
    except ConnectionResetError:
        pass
    finally:
        writer.close()
        idle.close()
