"""The agent's HTTP proxy over real sockets: a local app on 127.0.0.1, an asyncio server whose
handler calls ``serve_http``, and curl, http.client, websockets or raw sockets as visitors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import pytest

from burrow.http import limits
from burrow.http.policy import HttpOptions
from burrow.http.proxy import replay, serve_http
from burrow.http.record import BODY_CAP, Exchange
from helpers import SCALE

pytestmark = pytest.mark.timeout(30 * SCALE)

MiB = 1024 * 1024


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pattern(seed: int, size: int, chunk: int = 256 * 1024) -> list[bytes]:
    """Deterministic pseudo-random bytes in chunks (no two chunks alike, so order matters)."""
    rng = random.Random(seed)
    out, left = [], size
    while left:
        n = min(chunk, left)
        out.append(rng.randbytes(n))
        left -= n
    return out


def stream_pattern(seed: int, size: int, chunk: int = 256 * 1024) -> Any:
    rng = random.Random(seed)
    left = size
    while left:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


# --- the local app --------------------------------------------------------------------------------


class App:
    """A small HTTP/1.1 app on h11, with routes for each behaviour the proxy must carry."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.gate = asyncio.Event()
        self.sse_last_sent = 0.0
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        conn_id = self.connections
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await next_event(conn, reader)
                if not isinstance(request, h11.Request):
                    break
                await self._route(conn, reader, writer, request, conn_id)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            pass  # the app ends quietly, whatever the reason
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _route(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        conn_id: int,
    ) -> None:
        url = urlsplit(request.target.decode())
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        headers = [(n.decode(), v.decode()) for n, v in request.headers.raw_items()]
        record: dict[str, Any] = {
            "conn": conn_id,
            "method": request.method.decode(),
            "target": request.target.decode(),
            "headers": headers,
        }
        self.requests.append(record)

        def send(*events: h11.Event) -> None:
            for event in events:
                data = conn.send(event)
                if data:
                    writer.write(data)

        if request.method == b"CONNECT":
            send(h11.Response(status_code=200, headers=[]))
            leftover = conn.trailing_data[0]
            if leftover:
                writer.write(leftover)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            return
        if path == "/reject":
            send(
                h11.Response(status_code=401, headers=[("Content-Length", "4")]),
                h11.Data(data=b"nope"),
                h11.EndOfMessage(),
            )
            return
        if query.get("continue") and conn.they_are_waiting_for_100_continue:
            send(h11.InformationalResponse(status_code=100, headers=[]))
        if path == "/sha":
            digest, size = hashlib.sha256(), 0
            while True:
                event = await next_event(conn, reader)
                if isinstance(event, h11.Data):
                    digest.update(event.data)
                    size += len(event.data)
                else:
                    break
            body = f"{digest.hexdigest()} {size}".encode()
            send(h11.Response(status_code=200, headers=[("Content-Length", str(len(body)))]))
            send(h11.Data(data=body), h11.EndOfMessage())
            await writer.drain()
            return
        body = await read_body(conn, reader)
        record["body"] = body
        if path == "/echo":
            payload = json.dumps({**record, "body": body.decode("latin-1")}).encode()
            send(
                h11.Response(
                    status_code=200,
                    headers=[
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(payload))),
                        ("Server", "test-app"),
                        ("X-App", "1"),
                        ("Connection", "keep-alive"),
                        ("Keep-Alive", "timeout=5"),
                    ],
                ),
                h11.Data(data=payload),
                h11.EndOfMessage(),
            )
        elif path.startswith("/id/"):
            await asyncio.sleep(random.random() * 0.02)
            reply = f"id={path[4:]}".encode()
            send(
                h11.Response(status_code=200, headers=[("Content-Length", str(len(reply)))]),
                h11.Data(data=reply),
                h11.EndOfMessage(),
            )
        elif path == "/head":
            send(h11.Response(status_code=200, headers=[("Content-Length", "11")]))
            if request.method != b"HEAD":
                send(h11.Data(data=b"hello world"))
            send(h11.EndOfMessage())
        elif path in ("/204", "/304"):
            status = int(path[1:])
            send(h11.Response(status_code=status, headers=[("ETag", '"v1"')]), h11.EndOfMessage())
        elif path == "/redirect":
            send(
                h11.Response(
                    status_code=302,
                    headers=[("Location", "/elsewhere?x=1"), ("Content-Length", "5")],
                ),
                h11.Data(data=b"moved"),
                h11.EndOfMessage(),
            )
        elif path == "/chunked":
            send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]))
            for part in (b"alpha-", b"beta-", b"gamma"):
                send(h11.Data(data=part))
                await writer.drain()
                await asyncio.sleep(0.01)
            send(h11.EndOfMessage(headers=[("X-Checksum", "abc")]))
        elif path == "/raw10":
            # No Content-Length, no chunking: the body ends when the connection does.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-close body")
            await writer.drain()
            writer.close()
            raise ConnectionError("closed on purpose")
        elif path == "/download":
            size, seed = int(query["size"]), int(query.get("seed", "1"))
            send(h11.Response(status_code=200, headers=[("Content-Length", str(size))]))
            for chunk in stream_pattern(seed, size):
                send(h11.Data(data=chunk))
                await writer.drain()
            send(h11.EndOfMessage())
        elif path == "/sse":
            send(
                h11.Response(
                    status_code=200,
                    headers=[("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")],
                )
            )
            for n in range(1, 6):
                send(h11.Data(data=f"data: event {n}\n\n".encode()))
                await writer.drain()
                if n == 1:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5 * SCALE):
                            await self.gate.wait()
                await asyncio.sleep(0.02)
            self.sse_last_sent = time.monotonic()
            send(h11.EndOfMessage())
        elif path == "/garbage":
            writer.write(b"SPDY/9 700 What\r\n\r\n")
        elif path == "/hang":
            await asyncio.sleep(60)
        elif path == "/quiet-close":
            send(
                h11.Response(status_code=200, headers=[("Content-Length", "2")]),
                h11.Data(data=b"ok"),
                h11.EndOfMessage(),
            )
            await writer.drain()
            writer.close()  # keep-alive announced, then closed anyway (like a server timeout)
            raise ConnectionError("closed on purpose")
        else:
            send(
                h11.Response(status_code=404, headers=[("Content-Length", "0")]),
                h11.EndOfMessage(),
            )
        await writer.drain()


async def next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        return event


async def read_body(conn: h11.Connection, reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        event = await next_event(conn, reader)
        if isinstance(event, h11.Data):
            body += event.data
        else:
            return bytes(body)


@contextlib.asynccontextmanager
async def running_app(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[App]:
    app = App()
    await app.start(ssl_context)
    try:
        yield app
    finally:
        await app.stop()


@contextlib.asynccontextmanager
async def running_proxy(
    options: HttpOptions,
    recorder: Any = None,
    wrap: Callable[[Any, Any], tuple[Any, Any]] | None = None,
) -> AsyncIterator[int]:
    tasks: set[asyncio.Task[None]] = set()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        host, port = writer.get_extra_info("peername")[:2]
        r, w = wrap(reader, writer) if wrap else (reader, writer)
        try:
            await serve_http(r, w, options=options, peer=(host, port), recorder=recorder)
        except asyncio.CancelledError:
            pass  # the fixture ends: asyncio would log a cancelled handler as an error
        finally:
            tasks.discard(task)

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def stack(**option_kw: Any) -> AsyncIterator[tuple[App, int, HttpOptions]]:
    async with running_app() as app:
        options = HttpOptions(local=("127.0.0.1", app.port), name="web", **option_kw)
        async with running_proxy(options) as port:
            yield app, port, options


# --- visitors -------------------------------------------------------------------------------------


async def curl(*args: str, stdin: bytes | None = None) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        str(20 * SCALE),
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out, err.decode(errors="replace")


def split_head(raw: bytes) -> tuple[list[bytes], bytes]:
    """curl -i output: the last head's lines (1xx heads skipped) and the body."""
    while True:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if lines[0].split(b" ")[1].startswith(b"1") and b" 101 " not in lines[0]:
            raw = rest
            continue
        return lines, rest


def header(lines: list[bytes], name: str) -> list[str]:
    out = []
    for line in lines[1:]:
        key, _, value = line.decode("latin-1").partition(":")
        if key.strip().lower() == name.lower():
            out.append(value.strip())
    return out


def http_request(
    port: int,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10 * SCALE)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


async def fetch(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: h11.Connection,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> tuple[h11.Response, bytes]:
    """One request on an open keep-alive connection with an h11 client."""
    all_headers = [("Host", "demo.example.net"), *(headers or [])]
    if body:
        all_headers.append(("Content-Length", str(len(body))))
    writer.write(conn.send(h11.Request(method=method, target=target, headers=all_headers)))
    if body:
        writer.write(conn.send(h11.Data(data=body)))
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
    response = await next_event(conn, reader)
    assert isinstance(response, h11.Response), response
    data = await read_body(conn, reader)
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
    return response, data


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = bytearray()
        async with asyncio.timeout(timeout * SCALE):
            while chunk := await reader.read(65536):
                out += chunk
        return bytes(out)
    finally:
        writer.close()


class ListRecorder:
    shows_headers = True

    def __init__(self) -> None:
        self.begun: list[Exchange] = []
        self.ended: list[Exchange] = []

    def begin(self, exchange: Exchange) -> None:
        assert exchange.status is None
        self.begun.append(exchange)

    def end(self, exchange: Exchange) -> None:
        self.ended.append(exchange)


# --- tests: basics --------------------------------------------------------------------------------


async def test_get_and_post_with_curl() -> None:
    async with stack() as (_app, port, _):
        rc, out, err = await curl("-i", f"http://127.0.0.1:{port}/echo?q=1")
        assert rc == 0, err
        lines, body = split_head(out)
        assert lines[0].startswith(b"HTTP/1.1 200")
        seen = json.loads(body)
        assert seen["method"] == "GET" and seen["target"] == "/echo?q=1"
        got = {k.lower(): v for k, v in seen["headers"]}
        assert got["host"] == f"127.0.0.1:{port}"
        assert got["x-forwarded-for"] == "127.0.0.1"
        assert got["x-forwarded-proto"] == "http"
        assert got["x-forwarded-host"] == f"127.0.0.1:{port}"
        # Hop-by-hop headers of the local hop stay there.
        assert header(lines, "Keep-Alive") == []
        assert header(lines, "X-App") == ["1"]

        rc, out, err = await curl(
            "--data-binary", "name=burrow&x=1", f"http://127.0.0.1:{port}/echo"
        )
        assert rc == 0, err
        seen = json.loads(out)
        assert seen["method"] == "POST" and seen["body"] == "name=burrow&x=1"


async def test_keep_alive_uses_one_local_connection() -> None:
    async with stack() as (app, port, _):
        urls = [f"http://127.0.0.1:{port}/id/{n}" for n in range(5)]
        rc, out, err = await curl("-w", " %{num_connects}\n", *urls)
        assert rc == 0, err
        assert out.decode().split() == [
            "id=0",
            "1",
            "id=1",
            "0",
            "id=2",
            "0",
            "id=3",
            "0",
            "id=4",
            "0",
        ]
        assert app.connections == 1


async def test_local_connection_closed_between_requests_is_redialled() -> None:
    async with stack() as (app, port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        try:
            for _ in range(3):
                response, body = await fetch(reader, writer, conn, "GET", "/quiet-close")
                assert (response.status_code, body) == (200, b"ok")
                await asyncio.sleep(0.05)
            response, body = await fetch(reader, writer, conn, "POST", "/echo", body=b"after")
            assert response.status_code == 200 and json.loads(body)["body"] == "after"
        finally:
            writer.close()
        assert app.connections == 4


async def test_head_204_304_and_redirect() -> None:
    async with stack() as (_, port, _opts):
        status, headers, body = await asyncio.to_thread(http_request, port, "HEAD", "/head")
        assert (status, headers["content-length"], body) == (200, "11", b"")
        status, headers, body = await asyncio.to_thread(http_request, port, "GET", "/head")
        assert (status, body) == (200, b"hello world")
        for code in (204, 304):
            status, headers, body = await asyncio.to_thread(http_request, port, "GET", f"/{code}")
            assert (status, body, headers["etag"]) == (code, b"", '"v1"')
        status, headers, body = await asyncio.to_thread(http_request, port, "GET", "/redirect")
        assert (status, headers["location"], body) == (302, "/elsewhere?x=1", b"moved")
        # Several of these on one connection: framing of bodiless responses is right.
        rc, out, err = await curl(
            "-I", f"http://127.0.0.1:{port}/head", f"http://127.0.0.1:{port}/204"
        )
        assert rc == 0 and out.count(b"HTTP/1.1") == 2, err


async def test_chunked_both_ways_with_trailers() -> None:
    async with stack() as (_, port, _opts):
        out = await raw_exchange(
            port,
            b"GET /chunked HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n",
        )
        head, _, body = out.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        assert body.startswith(b"6\r\nalpha-\r\n")
        assert body.endswith(b"0\r\nX-Checksum: abc\r\n\r\n")

        status, _, data = await asyncio.to_thread(http_request, port, "GET", "/chunked")
        assert (status, data) == (200, b"alpha-beta-gamma")

        payload = b"".join(pattern(7, 300_000))
        rc, out, err = await curl(
            "-T", "-", "-X", "POST", f"http://127.0.0.1:{port}/sha", stdin=payload
        )
        assert rc == 0, err
        assert out.decode() == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"


async def test_close_delimited_local_response() -> None:
    async with stack() as (_, port, _opts):
        status, headers, body = await asyncio.to_thread(http_request, port, "GET", "/raw10")
        assert (status, body) == (200, b"until-close body")
        assert headers.get("transfer-encoding") == "chunked"  # re-framed for an HTTP/1.1 visitor
        rc, out, err = await curl("-0", f"http://127.0.0.1:{port}/raw10")
        assert (rc, out) == (0, b"until-close body"), err


async def test_http10_client() -> None:
    async with stack() as (app, port, _):
        rc, out, err = await curl("-0", "-i", f"http://127.0.0.1:{port}/chunked")
        assert rc == 0, err
        lines, body = split_head(out)
        assert body == b"alpha-beta-gamma"
        assert header(lines, "Transfer-Encoding") == []
        out = await raw_exchange(port, b"GET /echo HTTP/1.0\r\n\r\n")  # no Host at all
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        got = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert got["host"] == f"127.0.0.1:{app.port}"


async def test_expect_100_relayed_from_local_service() -> None:
    async with stack() as (_, port, _opts):
        payload = os.urandom(200_000)
        started = time.monotonic()
        rc, out, err = await curl(
            "-v",
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            str(10 * SCALE),
            "--data-binary",
            "@-",
            f"http://127.0.0.1:{port}/sha?continue=1",
            stdin=payload,
        )
        assert rc == 0, err
        assert "< HTTP/1.1 100" in err
        assert out.decode() == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"
        assert time.monotonic() - started < 5 * SCALE


async def test_expect_100_sent_by_burrow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "CONTINUE_WAIT", 0.2)
    async with stack() as (_, port, _opts):
        payload = os.urandom(100_000)
        started = time.monotonic()
        rc, out, err = await curl(
            "-v",
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            str(10 * SCALE),
            "--data-binary",
            "@-",
            f"http://127.0.0.1:{port}/sha",
            stdin=payload,
        )
        assert rc == 0, err
        assert "< HTTP/1.1 100" in err
        assert out.decode() == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"
        assert time.monotonic() - started < 5 * SCALE  # curl alone would have waited 10 s


async def test_expect_100_refused_by_local_service() -> None:
    async with stack() as (_, port, _opts):
        started = time.monotonic()
        rc, out, err = await curl(
            "-v",
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            str(10 * SCALE),
            "--data-binary",
            "@-",
            f"http://127.0.0.1:{port}/reject",
            stdin=os.urandom(50_000),
        )
        assert rc == 0, err
        assert out == b"nope" and "< HTTP/1.1 401" in err
        assert "< HTTP/1.1 100" not in err
        assert time.monotonic() - started < 5 * SCALE


async def test_parallel_requests_pair_correctly() -> None:
    async with stack() as (_, port, _opts):

        async def visitor(n: int) -> list[str]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            conn = h11.Connection(h11.CLIENT)
            try:
                got = []
                for k in range(3):
                    method, body = ("POST", f"body-{n}-{k}".encode()) if k == 1 else ("GET", b"")
                    response, data = await fetch(
                        reader, writer, conn, method, f"/id/{n}-{k}", body=body
                    )
                    assert response.status_code == 200
                    got.append(data.decode())
                return got
            finally:
                writer.close()

        results = await asyncio.gather(*(visitor(n) for n in range(100)))
        for n, got in enumerate(results):
            assert got == [f"id={n}-{k}" for k in range(3)]

        # Pipelined: five requests written at once come back in order.
        pipelined = (
            b"".join(f"GET /id/p{k} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for k in range(5))
            + b"GET /id/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        out = await raw_exchange(port, pipelined)
        ids = [part.split(b"\r\n\r\n")[1][:8] for part in out.split(b"HTTP/1.1 200 ")[1:]]
        assert [i.rstrip(b"H") for i in ids] == [
            b"id=p0",
            b"id=p1",
            b"id=p2",
            b"id=p3",
            b"id=p4",
            b"id=last",
        ]


async def test_websocket_echo() -> None:
    websockets = pytest.importorskip("websockets.asyncio.server")
    from websockets.asyncio.client import connect

    async def echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    async with websockets.serve(echo, "127.0.0.1", 0, compression=None, max_size=None) as ws_server:
        ws_port = ws_server.sockets[0].getsockname()[1]
        recorder = ListRecorder()
        options = HttpOptions(local=("127.0.0.1", ws_port))
        async with running_proxy(options, recorder) as port:
            async with connect(
                f"ws://127.0.0.1:{port}/chat", compression=None, max_size=None
            ) as ws:
                await ws.send("hello")
                assert await ws.recv() == "hello"
                blob = os.urandom(2 * MiB)
                await ws.send(blob)
                assert await ws.recv() == blob
                for n in range(20):
                    await ws.send(f"m{n}")
                assert [await ws.recv() for _ in range(20)] == [f"m{n}" for n in range(20)]
            assert recorder.ended and recorder.ended[0].status == 101


async def test_connect_is_spliced() -> None:
    async with stack() as (_, port, _opts):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\nearly"
            )
            await writer.drain()
            async with asyncio.timeout(5 * SCALE):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                assert await reader.readexactly(5) == b"early"
                writer.write(b"raw bytes \x00\xff")
                await writer.drain()
                assert await reader.readexactly(12) == b"raw bytes \x00\xff"
                writer.write_eof()  # half-close: the app echoes, then ends too
                assert await reader.read() == b""
        finally:
            writer.close()


async def test_server_sent_events_are_not_buffered() -> None:
    async with stack() as (app, port, _opts):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /sse HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
            await writer.drain()
            seen = bytearray()
            async with asyncio.timeout(4 * SCALE):
                while b"data: event 1" not in seen:
                    seen += await reader.read(4096)
            assert app.sse_last_sent == 0.0  # the first arrived while the app held the rest
            assert b"text/event-stream" in seen
            app.gate.set()
            async with asyncio.timeout(5 * SCALE):
                while b"0\r\n\r\n" not in seen:
                    seen += await reader.read(4096)
            assert [f"data: event {n}".encode() in seen for n in range(1, 6)] == [True] * 5
        finally:
            writer.close()


# --- tests: large bodies --------------------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.timeout(60 * SCALE)
async def test_200mb_upload_and_download_with_bounded_memory() -> None:
    size = 200 * MiB
    async with stack() as (_, port, _opts):
        baseline = rss()
        peak = baseline
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss())
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        try:
            # Download through curl, hashed as it streams out of curl's stdout.
            proc = await asyncio.create_subprocess_exec(
                "curl",
                "-sS",
                "--max-time",
                str(40 * SCALE),
                f"http://127.0.0.1:{port}/download?size={size}&seed=3",
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            digest, got = hashlib.sha256(), 0
            while chunk := await proc.stdout.read(MiB):
                digest.update(chunk)
                got += len(chunk)
            assert await proc.wait() == 0
            expected = hashlib.sha256()
            for chunk in stream_pattern(3, size):
                expected.update(chunk)
            assert (got, digest.hexdigest()) == (size, expected.hexdigest())

            # Upload through curl from a pipe (chunked), hashed by the app as it streams in.
            proc = await asyncio.create_subprocess_exec(
                "curl",
                "-sS",
                "--max-time",
                str(40 * SCALE),
                "-T",
                "-",
                "-X",
                "POST",
                f"http://127.0.0.1:{port}/sha",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdin is not None and proc.stdout is not None
            sent = hashlib.sha256()
            for chunk in stream_pattern(4, size):
                sent.update(chunk)
                proc.stdin.write(chunk)
                await proc.stdin.drain()
            proc.stdin.close()
            out = await proc.stdout.read()
            assert await proc.wait() == 0
            assert out.decode() == f"{sent.hexdigest()} {size}"
        finally:
            done.set()
            await sampler
        print(f"RSS growth {(peak - baseline) / MiB:.1f} MiB")
        assert peak - baseline < 50 * MiB, f"RSS grew by {(peak - baseline) / MiB:.1f} MiB"


async def test_streamed_content_length_upload_with_http_client() -> None:
    size = 20 * MiB
    async with stack() as (_, port, _opts):

        def upload() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20 * SCALE)
            try:
                conn.request(
                    "PUT",
                    "/sha",
                    body=stream_pattern(5, size),
                    headers={"Content-Length": str(size)},
                )
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        status, body = await asyncio.to_thread(upload)
        expected = hashlib.sha256(b"".join(pattern(5, size))).hexdigest()
        assert (status, body.decode()) == (200, f"{expected} {size}")


class TimingRecorder(ListRecorder):
    """Watches when exchanges begin and end only, as the agent's busy marker does."""

    shows_headers = False


async def test_text_headers_only_for_a_recorder_that_shows_them() -> None:
    async with running_app() as app:
        options = HttpOptions(local=("127.0.0.1", app.port))
        for recorder, shown in ((ListRecorder(), True), (TimingRecorder(), False)):
            async with running_proxy(options, recorder) as port:
                status, _, _ = await asyncio.to_thread(http_request, port, "GET", "/echo")
            assert status == 200
            (exchange,) = recorder.ended
            assert exchange.status == 200 and exchange.target == "/echo"
            names = {name.lower() for name, _ in exchange.request_headers}
            assert ("x-forwarded-for" in names) is shown
            assert bool(exchange.response_headers) is shown


# --- tests: failures ------------------------------------------------------------------------------


async def test_refused_local_service_gets_a_502_page() -> None:
    dead = free_port()
    options = HttpOptions(local=("127.0.0.1", dead))
    recorder = ListRecorder()
    async with running_proxy(options, recorder) as port:
        status, headers, body = await asyncio.to_thread(http_request, port, "GET", "/")
        assert status == 502
        assert f"the local service at 127.0.0.1:{dead} refused the connection".encode() in body
        assert headers["content-type"].startswith("text/html")
        # The connection stays usable: a second request on it gets the same answer.
        _, out, err = await curl(
            "-w",
            "%{http_code} %{num_connects}\n",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            f"http://127.0.0.1:{port}/a",
            f"http://127.0.0.1:{port}/b",
        )
        assert out.split() == [b"502", b"1", b"502", b"0"], err
        assert recorder.ended[0].status == 502
        assert "refused" in (recorder.ended[0].error or "")


async def test_local_name_with_several_addresses_refused() -> None:
    dead = free_port()
    options = HttpOptions(local=("localhost", dead))
    async with running_proxy(options) as port:
        status, _, body = await asyncio.to_thread(http_request, port, "GET", "/")
        assert status == 502 and b"localhost:" + str(dead).encode() + b" refused" in body


async def test_local_service_that_never_answers_gets_504() -> None:
    async with stack(response_timeout=0.5) as (_, port, _opts):
        started = time.monotonic()
        status, _, body = await asyncio.to_thread(http_request, port, "GET", "/hang")
        assert status == 504 and b"did not answer within 0.5 s" in body
        assert time.monotonic() - started < 3 * SCALE


async def test_local_service_that_never_accepts_gets_504(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def black_hole(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(30)

    async with stack(connect_timeout=0.3) as (app, port, _):
        monkeypatch.setattr(asyncio, "open_connection", black_hole)
        status, _, body = await asyncio.to_thread(http_request, port, "GET", "/")
        assert status == 504
        assert f"127.0.0.1:{app.port} did not accept the connection within 0.3 s".encode() in body


async def test_visitor_leaving_mid_response_frees_the_local_side() -> None:
    async with stack() as (app, port, _opts):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /download?size=500000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readexactly(MiB)
        writer.transport.abort()
        async with asyncio.timeout(5 * SCALE):
            while app._tasks:
                await asyncio.sleep(0.02)


async def test_slow_or_bad_request_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "HEAD_TIMEOUT", 0.3)
    async with stack() as (app, port, _):
        out = await raw_exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 ")
        out = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000)
        assert out.startswith(b"HTTP/1.1 431 ")
        out = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert out.startswith(b"HTTP/1.1 408 ")
        assert app.requests == []
        out = await raw_exchange(
            port,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        )
        assert out.startswith(b"HTTP/1.1 400 ")


async def test_broken_local_response_gets_502() -> None:
    async with stack() as (_, port, _opts):
        status, _, body = await asyncio.to_thread(http_request, port, "GET", "/garbage")
        assert status == 502 and b"sent a broken response" in body


# --- tests: policy on the wire --------------------------------------------------------------------


async def test_basic_auth_on_the_wire() -> None:
    async with stack(basic_auth=["alice:s3cret"]) as (app, port, _):
        status, headers, _ = await asyncio.to_thread(
            http_request, port, "GET", "/echo", None, {"Authorization": "Basic YTpi"}
        )
        assert status == 401
        assert headers["www-authenticate"] == 'Basic realm="burrow", charset="UTF-8"'
        rc, out, err = await curl("-u", "alice:s3cret", f"http://127.0.0.1:{port}/echo")
        assert rc == 0, err
        seen = {k.lower() for k, _ in json.loads(out)["headers"]}
        assert "authorization" not in seen
        # 401 then the right password on the same connection (a browser's retry).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        try:
            response, _ = await fetch(reader, writer, conn, "POST", "/echo", body=b"x" * 1000)
            assert response.status_code == 401
            token = base64.b64encode(b"alice:s3cret").decode()
            response, body = await fetch(
                reader,
                writer,
                conn,
                "POST",
                "/echo",
                [("Authorization", f"Basic {token}")],
                b"y" * 1000,
            )
            assert response.status_code == 200 and json.loads(body)["body"] == "y" * 1000
        finally:
            writer.close()
        assert len(app.requests) == 2


async def test_denied_exchange_is_recorded_without_the_password() -> None:
    recorder = ListRecorder()
    options = HttpOptions(local=("127.0.0.1", free_port()), basic_auth=["alice:s3cret"])
    async with running_proxy(options, recorder) as port:
        status, _, _ = await asyncio.to_thread(
            http_request, port, "GET", "/", None, {"Authorization": "Basic YWxpY2U6czNjcmVU"}
        )
    assert status == 401
    (denied,) = recorder.ended
    assert denied.status == 401 and ("Authorization", "[redacted]") in denied.request_headers


async def test_ip_rules_on_the_wire() -> None:
    for kw, expected in (
        ({"deny": ["127.0.0.0/8"]}, 403),
        ({"allow": ["10.0.0.0/8"]}, 403),
        ({"allow": ["127.0.0.1/32"], "deny": ["10.0.0.0/8"]}, 200),
    ):
        async with stack(**kw) as (_, port, _opts):
            status, _, body = await asyncio.to_thread(
                http_request, port, "GET", "/echo", None, {"X-Forwarded-For": "10.0.0.1"}
            )
            assert status == expected, (kw, body)


async def test_header_rules_and_spoofing_on_the_wire() -> None:
    async with stack(
        request_header_add=["X-Env: dev"],
        request_header_remove=["X-Drop"],
        response_header_add=["X-Frame-Options: DENY"],
        response_header_remove=["Server"],
    ) as (_, port, _opts):
        status, headers, body = await asyncio.to_thread(
            http_request,
            port,
            "GET",
            "/echo",
            None,
            {"X-Drop": "1", "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil"},
        )
        assert status == 200
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert seen["x-env"] == "dev" and "x-drop" not in seen
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-host"] == f"127.0.0.1:{port}"
        assert headers["x-frame-options"] == "DENY" and "server" not in headers


async def test_host_header_rewrite_on_the_wire() -> None:
    async with stack(host_header="rewrite") as (app, port, _):
        _, _, body = await asyncio.to_thread(http_request, port, "GET", "/echo")
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert seen["host"] == f"127.0.0.1:{app.port}"
        assert seen["x-forwarded-host"] == f"127.0.0.1:{port}"
    async with stack(host_header="app.internal") as (app, port, _):
        _, _, body = await asyncio.to_thread(http_request, port, "GET", "/echo")
        assert {k.lower(): v for k, v in json.loads(body)["headers"]}["host"] == "app.internal"


# --- tests: inspector and replay ------------------------------------------------------------------


async def test_recorder_sees_each_exchange() -> None:
    recorder = ListRecorder()
    async with running_app() as app:
        options = HttpOptions(local=("127.0.0.1", app.port), name="web")
        async with running_proxy(options, recorder) as port:
            big = os.urandom(2 * MiB)
            rc, _, err = await curl(
                "--data-binary", "@-", f"http://127.0.0.1:{port}/sha", stdin=big
            )
            assert rc == 0, err
            size = 3 * MiB
            rc, out, err = await curl(f"http://127.0.0.1:{port}/download?size={size}")
            assert rc == 0 and len(out) == size, err
            await asyncio.to_thread(http_request, port, "GET", "/redirect")
    assert [e.target for e in recorder.begun] == [e.target for e in recorder.ended]
    upload, download, redirect = recorder.ended
    assert upload.method == "POST" and upload.status == 200 and upload.tunnel == "web"
    assert upload.request_size == len(big) and bytes(upload.request_body) == big[:BODY_CAP]
    assert upload.request_truncated
    assert upload.client.startswith("127.0.0.1:")
    assert download.response_size == size and len(download.response_body) == BODY_CAP
    assert redirect.status == 302 and bytes(redirect.response_body) == b"moved"
    assert ("Location", "/elsewhere?x=1") in redirect.response_headers
    assert all(e.duration is not None and e.error is None for e in recorder.ended)


async def test_replay_resends_a_post() -> None:
    recorder = ListRecorder()
    async with running_app() as app:
        options = HttpOptions(local=("127.0.0.1", app.port), name="web")
        async with running_proxy(options, recorder) as port:
            status, _, _ = await asyncio.to_thread(
                http_request,
                port,
                "POST",
                "/echo?n=1",
                b'{"order": 42}',
                {"Content-Type": "application/json"},
            )
            assert status == 200
        original = recorder.ended[0]
        again = await replay(options, original)
        assert again.replay_of == original.id and again.status == 200
        assert json.loads(again.response_body)["body"] == '{"order": 42}'
    first, second = app.requests
    assert (first["method"], first["target"], first["body"]) == (
        second["method"],
        second["target"],
        second["body"],
    )
    h1 = {k.lower(): v for k, v in first["headers"]}
    h2 = {k.lower(): v for k, v in second["headers"]}
    assert h1["content-type"] == h2["content-type"] == "application/json"
    assert h1["x-forwarded-for"] == h2["x-forwarded-for"] == "127.0.0.1"

    # Replaying against a dead local service records the failure instead of raising.
    dead = HttpOptions(local=("127.0.0.1", free_port()))
    failed = await replay(dead, original)
    assert failed.status == 502 and "refused" in (failed.error or "")


# --- tests: other transports ----------------------------------------------------------------------


class DuckReader:
    """Only the StreamReader methods a Channel has."""

    def __init__(self, inner: asyncio.StreamReader) -> None:
        self._inner = inner

    async def read(self, n: int = -1) -> bytes:
        return await self._inner.read(min(n, 1000) if n > 0 else n)  # short reads, like frames

    async def readexactly(self, n: int) -> bytes:
        return await self._inner.readexactly(n)

    def at_eof(self) -> bool:
        return self._inner.at_eof()


class DuckWriter:
    """Only the StreamWriter methods a Channel has."""

    def __init__(self, inner: asyncio.StreamWriter) -> None:
        self._inner = inner

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    def writelines(self, lines: list[bytes]) -> None:
        for line in lines:
            self.write(line)

    async def drain(self) -> None:
        await self._inner.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self._inner.is_closing():
            self._inner.write_eof()

    def close(self) -> None:
        self._inner.close()

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)


async def test_duck_typed_streams() -> None:
    async with running_app() as app:
        options = HttpOptions(local=("127.0.0.1", app.port))

        def wrap(r: Any, w: Any) -> tuple[Any, Any]:
            return DuckReader(r), DuckWriter(w)

        async with running_proxy(options, wrap=wrap) as port:
            rc, out, err = await curl(
                "--data-binary",
                "@-",
                f"http://127.0.0.1:{port}/echo",
                f"http://127.0.0.1:{port}/chunked",
                stdin=b"z" * 5000,
            )
            assert rc == 0, err
            assert out.endswith(b"alpha-beta-gamma")
            assert json.loads(out[: -len(b"alpha-beta-gamma")])["body"] == "z" * 5000


async def test_https_local_service(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with running_app(server_ctx) as app:
        good = HttpOptions(local=("127.0.0.1", app.port), local_https=True, local_ca=ca_file)
        async with running_proxy(good) as port:
            status, _, body = await asyncio.to_thread(http_request, port, "POST", "/echo", b"tls")
            assert status == 200 and json.loads(body)["body"] == "tls"
        unverified = HttpOptions(local=("127.0.0.1", app.port), local_https=True)
        async with running_proxy(unverified) as port:
            status, _, body = await asyncio.to_thread(http_request, port, "GET", "/echo")
            assert status == 502 and b"does not verify" in body
        insecure = HttpOptions(local=("127.0.0.1", app.port), local_https=True, local_insecure=True)
        async with running_proxy(insecure) as port:
            status, _, _ = await asyncio.to_thread(http_request, port, "GET", "/echo")
            assert status == 200
