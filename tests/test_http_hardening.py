"""HTTP tunnels against request smuggling, cross-tenant keep-alive and spoofed client addresses,
end to end: raw visitor bytes -> the relay's HTTP listener -> TLS session -> agent -> a local
service that is itself naive on purpose (it trusts Content-Length, as the back ends that
smuggling exploits do), and records every request it parses.

Each case is run in two shapes: a head that arrives in one piece (the agent's fast path reads
it first) and one that the agent's h11 engine must read (a head split across writes, or a
chunked body, which the fast path never keeps).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest

from burrow.http.policy import HttpOptions
from burrow.http.service import HttpTunnelSpec
from burrow.node import Relay
from burrow.roles.agent import Agent
from helpers import SCALE, Events, agent_config, relay_config

pytestmark = pytest.mark.timeout(60)

#: Most bytes the naive service buffers from one connection before it gives up on it.
SERVICE_BUFFER = 1024 * 1024


# --- a local service that trusts Content-Length ---------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class NaiveService:
    """Reads a head, then exactly Content-Length bytes, then takes whatever follows as the next
    request; answers each with its target. ``answer`` overrides the answer's head and body."""

    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    answer: bytes | None = None
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def targets(self) -> list[str]:
        return [seen.target for seen in self.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        buf = b""
        try:
            while len(buf) <= SERVICE_BUFFER:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    data = await reader.read(65536)
                    if not data:
                        break
                    buf += data
                    continue
                lines = buf[:end].decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [
                    (n.strip(), v.strip()) for n, _, v in (x.partition(":") for x in lines[1:])
                ]
                lengths = [int(v) for n, v in headers if n.lower() == "content-length"]
                chunked = any(n.lower() == "transfer-encoding" for n, _ in headers)
                buf = buf[end + 4 :]
                if chunked and not lengths:  # Content-Length, when there is one, wins here
                    body, buf = await self._chunked(reader, buf)
                else:
                    length = lengths[0] if lengths else 0
                    while len(buf) < length:
                        data = await reader.read(65536)
                        if not data:
                            return
                        buf += data
                    body, buf = buf[:length], buf[length:]
                self.requests.append(Seen(method, target, headers, body))
                if self.answer is not None:
                    writer.write(self.answer)
                else:
                    text = f"seen {target}".encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)
                    )
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader, buf: bytes) -> tuple[bytes, bytes]:
        """A chunked body from ``buf`` and the reader: (body, bytes after it)."""
        body = b""
        while len(buf) <= SERVICE_BUFFER:
            line_end = buf.find(b"\r\n")
            size = int(buf[:line_end], 16) if line_end >= 0 else -1
            if size == 0 and b"\r\n\r\n" in buf[line_end:]:
                return body, buf[buf.index(b"\r\n\r\n", line_end) + 4 :]
            if size > 0 and len(buf) >= line_end + 2 + size + 2:
                body += buf[line_end + 2 : line_end + 2 + size]
                buf = buf[line_end + 2 + size + 2 :]
                continue
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed inside a chunked body")
            buf += data
        raise ConnectionError("chunked body too large")


@contextlib.asynccontextmanager
async def naive_service() -> AsyncIterator[NaiveService]:
    service = NaiveService()
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


# --- a relay and an agent with one or more HTTP tunnels -------------------------------------------


@dataclass
class Tunnels:
    relay: Relay
    agent: Agent

    @property
    def port(self) -> int:
        return int(self.relay.http.addresses["http"][1])

    def host(self, name: str) -> str:
        return f"{name}.localhost:{self.port}"


@contextlib.asynccontextmanager
async def tunnels(tmp: Path, **services: NaiveService) -> AsyncIterator[Tunnels]:
    """One relay with an HTTP listener, one agent exposing each service under its name."""
    relay = Relay(relay_config(tmp, http_listen=("127.0.0.1", 0)), on_event=Events())
    await relay.start()
    try:
        specs = [
            HttpTunnelSpec(options=HttpOptions(local=("127.0.0.1", s.port)), name=name)
            for name, s in services.items()
        ]
        config = agent_config(relay, ("127.0.0.1", 1), tunnel=specs[0], tunnels=specs)
        agent = Agent(config, on_event=Events())
        await agent.start()
        try:
            yield Tunnels(relay, agent)
        finally:
            await agent.close()
    finally:
        await relay.close()


# --- a raw visitor --------------------------------------------------------------------------------


class Visitor:
    """Raw bytes to the relay's HTTP port, and h11 to read what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *parts: bytes) -> None:
        """Each part in its own write, a little apart, so the agent reads them separately."""
        for n, part in enumerate(parts):
            if n:
                await asyncio.sleep(0.05 * SCALE)
            self.writer.write(part)
            await self.writer.drain()

    async def response(self, method: str = "GET") -> tuple[h11.Response, bytes]:
        """The next response (what h11 needs to know of the request is given by ``method``)."""
        self.conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        self.conn.send(h11.EndOfMessage())
        head: h11.Response | None = None
        body = b""
        async with asyncio.timeout(10 * SCALE):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.reader.read(65536))
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise AssertionError(f"unexpected {event!r}")
        assert head is not None
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return head, body

    async def closed(self) -> bool:
        """Whether the agent closes the connection (rather than waiting for another request)."""
        try:
            async with asyncio.timeout(10 * SCALE):
                while await self.reader.read(65536):
                    pass
        except (TimeoutError, ConnectionError):
            return False
        return True


@contextlib.asynccontextmanager
async def visitor(port: int) -> AsyncIterator[Visitor]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Visitor(reader, writer)
    finally:
        writer.close()


def header(response: h11.Response, name: str) -> list[bytes]:
    return [v for n, v in response.headers if n == name.lower().encode()]


# --- CL+TE: the smuggling the issue reproduced ----------------------------------------------------


def smuggling_request(host: str) -> bytes:
    """A POST framed two ways: chunked, its one chunk holding a second request (with a header
    the visitor may not set); and Content-Length 4, which ends it inside that chunk."""
    hidden = f"GET /hidden HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n".encode()
    chunk = b"%x\r\n" % len(hidden) + hidden + b"\r\n0\r\n\r\n"
    return (
        f"POST /first HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunk


@pytest.mark.parametrize("split", [False, True], ids=["head-whole", "head-split"])
async def test_cl_te_request_is_refused_and_nothing_reaches_the_service(
    tmp_path: Path, split: bool
) -> None:
    async with naive_service() as service, tunnels(tmp_path, demo=service) as t:
        async with visitor(t.port) as v:
            # A normal request first, so the smuggle rides a kept-alive connection.
            await v.send(f"GET /before HTTP/1.1\r\nHost: {t.host('demo')}\r\n\r\n".encode())
            response, body = await v.response()
            assert response.status_code == 200 and body == b"seen /before"
            raw = smuggling_request(t.host("demo"))
            head_end = raw.index(b"\r\n\r\n") + 4
            await v.send(*((raw[:40], raw[40:]) if split else (raw[:head_end], raw[head_end:])))
            response, body = await v.response("POST")
            closed = await v.closed()
        assert service.targets() == ["/before"]  # neither /first nor the hidden /hidden
        assert response.status_code == 400
        assert b"Transfer-Encoding and Content-Length" in body
        assert closed


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: chunked, gzip\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 4\r\nContent-Length: 40\r\n",
        b"Content-Length: 4, 40\r\n",
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    ],
    ids=["gzip", "chunked-not-last", "chunked-twice", "two-lengths", "length-list", "cl-te"],
)
@pytest.mark.parametrize("first", [True, False], ids=["first-request", "kept-alive"])
async def test_ambiguous_framing_is_refused_with_400(
    tmp_path: Path, framing: bytes, first: bool
) -> None:
    """On a connection's first request the relay refuses it; on later ones the agent does."""
    async with naive_service() as service, tunnels(tmp_path, demo=service) as t:
        async with visitor(t.port) as v:
            if not first:
                await v.send(f"GET /before HTTP/1.1\r\nHost: {t.host('demo')}\r\n\r\n".encode())
                response, _ = await v.response()
                assert response.status_code == 200
            await v.send(
                f"POST /x HTTP/1.1\r\nHost: {t.host('demo')}\r\n".encode()
                + framing
                + b"\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            response, _ = await v.response("POST")
            assert response.status_code == 400
            assert await v.closed()
        assert service.targets() == ([] if first else ["/before"])


async def test_chunked_request_reaches_the_service_without_content_length(
    tmp_path: Path,
) -> None:
    """The allowed form still works: chunked alone, which the agent frames for the service."""
    async with naive_service() as service, tunnels(tmp_path, demo=service) as t:
        service.answer = b"HTTP/1.1 204 No Content\r\n\r\n"
        async with visitor(t.port) as v:
            await v.send(
                f"POST /chunked HTTP/1.1\r\nHost: {t.host('demo')}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n".encode()
            )
            response, _ = await v.response("POST")
            assert response.status_code == 204
        (seen,) = service.requests
        assert seen.header("Transfer-Encoding") == ["chunked"]
        assert seen.header("Content-Length") == []


async def test_response_with_cl_and_te_is_relayed_chunked_without_content_length(
    tmp_path: Path,
) -> None:
    async with naive_service() as service, tunnels(tmp_path, demo=service) as t:
        service.answer = (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        async with visitor(t.port) as v:
            for n in range(2):
                await v.send(f"GET /r{n} HTTP/1.1\r\nHost: {t.host('demo')}\r\n\r\n".encode())
                response, body = await v.response()
                assert response.status_code == 200 and body == b"hello"
                assert header(response, "Content-Length") == []
                assert header(response, "Transfer-Encoding") == [b"chunked"]
        assert service.targets() == ["/r0", "/r1"]
        # The local connection that framed a response two ways was not trusted again.
        assert service.connections == 2


# --- one tenant per connection --------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["fast", "h11"])
async def test_another_host_on_the_same_connection_gets_421(tmp_path: Path, engine: str) -> None:
    async with (
        naive_service() as cap,
        naive_service() as other,
        tunnels(tmp_path, cap=cap, other=other) as t,
    ):

        def request(target: str, host: str) -> bytes:
            if engine == "fast":
                return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            return (  # a chunked body: only the h11 engine takes it
                f"POST {target} HTTP/1.1\r\nHost: {host}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
            ).encode()

        method = "GET" if engine == "fast" else "POST"
        async with visitor(t.port) as v:
            await v.send(request("/one", t.host("cap")))
            response, _ = await v.response(method)
            assert response.status_code == 200
            # Same host, spelled with other case and no port: the same tenant.
            await v.send(request("/two", "CAP.localhost"))
            response, _ = await v.response(method)
            assert response.status_code == 200
            await v.send(request("/three", t.host("other")) + request("/four", t.host("cap")))
            response, body = await v.response(method)
            assert response.status_code == 421
            assert b"other.localhost" in body
            assert await v.closed()
        assert cap.targets() == ["/one", "/two"]
        assert other.requests == []
        # A new connection for the other host reaches it.
        async with visitor(t.port) as v:
            await v.send(request("/five", t.host("other")))
            response, _ = await v.response(method)
            assert response.status_code == 200
        assert other.targets() == ["/five"]


# --- client-address headers -----------------------------------------------------------------------

SPOOFED = {
    "X-Real-IP": "6.6.6.6",
    "True-Client-IP": "6.6.6.6",
    "X-Client-IP": "6.6.6.6",
    "CF-Connecting-IP": "6.6.6.6",
    "Fastly-Client-IP": "6.6.6.6",
    "X-Cluster-Client-IP": "6.6.6.6",
    "X-Forwarded-For": "6.6.6.6",
}


@pytest.mark.parametrize("engine", ["fast", "h11"])
async def test_visitor_client_address_headers_never_reach_the_service(
    tmp_path: Path, engine: str
) -> None:
    async with naive_service() as service, tunnels(tmp_path, demo=service) as t:
        spoofed = "".join(f"{n}: {v}\r\n" for n, v in SPOOFED.items())
        if engine == "fast":
            raw = f"GET /ip HTTP/1.1\r\nHost: {t.host('demo')}\r\n{spoofed}\r\n".encode()
        else:
            raw = (
                f"POST /ip HTTP/1.1\r\nHost: {t.host('demo')}\r\n{spoofed}"
                "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ).encode()
        async with visitor(t.port) as v:
            await v.send(raw)
            response, _ = await v.response("GET" if engine == "fast" else "POST")
            assert response.status_code == 200
        (seen,) = service.requests
        assert seen.header("X-Real-IP") == ["127.0.0.1"]
        assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
        for name in SPOOFED:
            if name not in ("X-Real-IP", "X-Forwarded-For"):
                assert seen.header(name) == [], name
        assert "6.6.6.6" not in str(seen.headers)
